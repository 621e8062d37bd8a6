"""Simulated power loss (issue 16): ``recording_io.c`` records one run of ``workload.py``;
``crash_states.py`` builds what a power cut at any point of it could leave on disk;
``trials.py`` opens the store on each crash state in a child process and judges it.
``tests/test_power_loss.py`` is the short form, ``scripts/powerloss.py`` the long one."""
