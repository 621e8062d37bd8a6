/* failing_io.c: an LD_PRELOAD shim that makes the Nth file-system call of one family fail.
 *
 * SQLite's I/O-error loop, at the OS seam: a counting run learns how many calls of a family
 * a workload makes on the store's files, then run N fails call N, for every N.  Only calls on
 * files under FAULTSHIM_PREFIX count, so the interpreter, pytest and the workload's ledger are
 * never touched and N means the same call in every run of a deterministic workload.
 *
 *   FAULTSHIM_PREFIX      absolute path of the data directory (unset: the shim does nothing)
 *   FAULTSHIM_OP          family to fail: fdatasync fsync write rename truncate fallocate
 *   FAULTSHIM_N           fail its Nth call (1-based; 0 or unset: count only)
 *   FAULTSHIM_ERRNO       EIO (default) or ENOSPC, or a number
 *   FAULTSHIM_MODE        once (default) or from-then-on (call N and every later one fail)
 *   FAULTSHIM_COUNT_FILE  written at exit: "<family> <calls>" per family, then "fired <k>"
 *   FAULTSHIM_TRACE       if set, a file that gets "<family> <n> <path>[ at <offset>+<bytes>]
 *                         [ FAIL]" per counted call: what call N of a finding is
 *
 * "write" is every call that puts bytes in a file: LMDB flushes pages with pwrite and with
 * writev after lseek, Python's os.write is write, os.pwrite is pwrite(64).  A failed call
 * writes nothing, as a device error before any byte landed would.
 *
 * Build: gcc -shared -fPIC -O2 -o failing_io.so failing_io.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum family { FDATASYNC, FSYNC, WRITE, RENAME, TRUNCATE, FALLOCATE, FAMILIES };
static const char *const names[FAMILIES] = {"fdatasync", "fsync",    "write",
                                            "rename",    "truncate", "fallocate"};

static char prefix[4096];
static size_t prefix_len;
static int target = -1;
static long fail_at;
static int fail_errno = EIO;
static int persistent;
static const char *count_file;
static int trace_fd = -1;
/* Counted from several threads at once (LMDB's compacting copy runs in a thread of its own). */
static long calls[FAMILIES];
static long fired;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_truncate)(const char *, off_t);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_fallocate64)(int, int, off_t, off_t);
static int (*real_posix_fallocate)(int, off_t, off_t);
static int (*real_posix_fallocate64)(int, off_t, off_t);

#define RESOLVE(name) real_##name = dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void init(void) {
    RESOLVE(write); RESOLVE(pwrite); RESOLVE(pwrite64); RESOLVE(writev); RESOLVE(pwritev);
    RESOLVE(pwritev64); RESOLVE(pwritev2); RESOLVE(fsync); RESOLVE(fdatasync); RESOLVE(rename);
    RESOLVE(renameat); RESOLVE(renameat2); RESOLVE(ftruncate); RESOLVE(ftruncate64);
    RESOLVE(truncate); RESOLVE(fallocate); RESOLVE(fallocate64); RESOLVE(posix_fallocate);
    RESOLVE(posix_fallocate64);
    const char *p = getenv("FAULTSHIM_PREFIX");
    if (p && *p && strlen(p) < sizeof prefix) {
        strcpy(prefix, p);
        prefix_len = strlen(prefix);
        while (prefix_len > 1 && prefix[prefix_len - 1] == '/') prefix[--prefix_len] = '\0';
    }
    const char *op = getenv("FAULTSHIM_OP");
    for (int f = 0; op && f < FAMILIES; f++)
        if (strcmp(op, names[f]) == 0) target = f;
    const char *n = getenv("FAULTSHIM_N");
    fail_at = n ? atol(n) : 0;
    const char *e = getenv("FAULTSHIM_ERRNO");
    if (e && strcmp(e, "ENOSPC") == 0) fail_errno = ENOSPC;
    else if (e && atoi(e) > 0) fail_errno = atoi(e);
    const char *m = getenv("FAULTSHIM_MODE");
    persistent = m && strcmp(m, "from-then-on") == 0;
    count_file = getenv("FAULTSHIM_COUNT_FILE");
    const char *t = getenv("FAULTSHIM_TRACE");
    if (t && *t) trace_fd = open(t, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

/* Written at exit, not per call: a workload killed by a signal leaves no count, and the test
 * reports the signal instead. */
__attribute__((destructor)) static void report(void) {
    if (!count_file || !*count_file || !real_write) return;
    int fd = open(count_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[128];
    for (int f = 0; f < FAMILIES; f++) {
        long n = __atomic_load_n(&calls[f], __ATOMIC_SEQ_CST);
        int len = snprintf(line, sizeof line, "%s %ld\n", names[f], n);
        real_write(fd, line, (size_t)len);
    }
    long n = __atomic_load_n(&fired, __ATOMIC_SEQ_CST);
    int len = snprintf(line, sizeof line, "fired %ld\n", n);
    real_write(fd, line, (size_t)len);
    close(fd);
}

/* The path of the call being counted, for the trace (per thread: LMDB copies in its own). */
static __thread char traced[4096];
static __thread long long traced_at = -1, traced_len;

static int under_prefix(const char *path) {
    if (trace_fd >= 0) snprintf(traced, sizeof traced, "%s", path);
    return prefix_len && strncmp(path, prefix, prefix_len) == 0 &&
           (path[prefix_len] == '\0' || path[prefix_len] == '/');
}

/* Asked of the kernel on every call rather than cached per fd: a cache would have to follow
 * close, dup and fork to stay right, and a readlink costs about a microsecond. */
static int fd_under_prefix(int fd) {
    if (!prefix_len || fd < 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len <= 0) return 0;
    path[len] = '\0';
    return under_prefix(path);
}

/* A relative path is taken against its directory fd or the working directory; no ".."
 * folding, which the store never produces. */
static int at_under_prefix(int dirfd, const char *path) {
    if (!prefix_len || !path) return 0;
    if (path[0] == '/') return under_prefix(path);
    char dir[4096], full[8192];
    if (dirfd == AT_FDCWD) {
        if (!getcwd(dir, sizeof dir)) return 0;
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t len = readlink(link, dir, sizeof dir - 1);
        if (len <= 0) return 0;
        dir[len] = '\0';
    }
    snprintf(full, sizeof full, "%s/%s", dir, path);
    return under_prefix(full);
}

/* Counts a call of family f on the store's files; true when this one is to fail. */
static int should_fail(int f, int ours) {
    if (!ours) {
        traced_at = -1;
        return 0;
    }
    long n = __atomic_add_fetch(&calls[f], 1, __ATOMIC_SEQ_CST);
    int fail = f == target && fail_at > 0 && (n == fail_at || (persistent && n > fail_at));
    if (trace_fd >= 0) {
        char line[4200];
        char at[64] = "";
        if (traced_at >= 0) snprintf(at, sizeof at, " at %lld+%lld", traced_at, traced_len);
        int len = snprintf(line, sizeof line, "%s %ld %s%s%s\n", names[f], n, traced, at,
                           fail ? " FAIL" : "");
        traced_at = -1;
        real_write(trace_fd, line, (size_t)(len < (int)sizeof line ? len : (int)sizeof line - 1));
    }
    if (fail) __atomic_add_fetch(&fired, 1, __ATOMIC_SEQ_CST);
    return fail;
}

#define FAIL_IF(f, ours)          \
    if (should_fail(f, ours)) {   \
        errno = fail_errno;       \
        return -1;                \
    }

/* Where a write goes, for the trace only: a failing LMDB write is told apart by its offset
 * (the meta pages are the first two pages of data.mdb). */
#define NOTE(offset, length)                              \
    if (trace_fd >= 0) {                                  \
        int saved = errno; /* lseek of a pipe sets it */  \
        traced_at = (long long)(offset);                  \
        traced_len = (long long)(length);                 \
        errno = saved;                                    \
    }

static size_t total(const struct iovec *iov, int iovcnt) {
    size_t sum = 0;
    for (int i = 0; i < iovcnt; i++) sum += iov[i].iov_len;
    return sum;
}

/* stdin, stdout and stderr are never the store's: spare them the readlink. */
ssize_t write(int fd, const void *buf, size_t count) {
    NOTE(lseek(fd, 0, SEEK_CUR), count);
    FAIL_IF(WRITE, fd > 2 && fd_under_prefix(fd));
    return real_write(fd, buf, count);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    NOTE(offset, count);
    FAIL_IF(WRITE, fd_under_prefix(fd));
    return real_pwrite(fd, buf, count, offset);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    NOTE(offset, count);
    FAIL_IF(WRITE, fd_under_prefix(fd));
    return real_pwrite64(fd, buf, count, offset);
}
ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    NOTE(lseek(fd, 0, SEEK_CUR), total(iov, iovcnt));
    FAIL_IF(WRITE, fd_under_prefix(fd));
    return real_writev(fd, iov, iovcnt);
}
ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    NOTE(offset, total(iov, iovcnt));
    FAIL_IF(WRITE, fd_under_prefix(fd));
    return real_pwritev(fd, iov, iovcnt, offset);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    NOTE(offset, total(iov, iovcnt));
    FAIL_IF(WRITE, fd_under_prefix(fd));
    return real_pwritev64(fd, iov, iovcnt, offset);
}
ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) {
    NOTE(offset, total(iov, iovcnt));
    FAIL_IF(WRITE, fd_under_prefix(fd));
    return real_pwritev2(fd, iov, iovcnt, offset, flags);
}
int fsync(int fd) {
    FAIL_IF(FSYNC, fd_under_prefix(fd));
    return real_fsync(fd);
}
int fdatasync(int fd) {
    FAIL_IF(FDATASYNC, fd_under_prefix(fd));
    return real_fdatasync(fd);
}
/* A rename counts when either end is the store's: a file renamed into or out of it. */
int rename(const char *from, const char *to) {
    FAIL_IF(RENAME, at_under_prefix(AT_FDCWD, from) || at_under_prefix(AT_FDCWD, to));
    return real_rename(from, to);
}
int renameat(int fromfd, const char *from, int tofd, const char *to) {
    FAIL_IF(RENAME, at_under_prefix(fromfd, from) || at_under_prefix(tofd, to));
    return real_renameat(fromfd, from, tofd, to);
}
int renameat2(int fromfd, const char *from, int tofd, const char *to, unsigned flags) {
    FAIL_IF(RENAME, at_under_prefix(fromfd, from) || at_under_prefix(tofd, to));
    return real_renameat2(fromfd, from, tofd, to, flags);
}
int ftruncate(int fd, off_t length) {
    FAIL_IF(TRUNCATE, fd_under_prefix(fd));
    return real_ftruncate(fd, length);
}
int ftruncate64(int fd, off_t length) {
    FAIL_IF(TRUNCATE, fd_under_prefix(fd));
    return real_ftruncate64(fd, length);
}
int truncate(const char *path, off_t length) {
    FAIL_IF(TRUNCATE, at_under_prefix(AT_FDCWD, path));
    return real_truncate(path, length);
}
int fallocate(int fd, int mode, off_t offset, off_t len) {
    FAIL_IF(FALLOCATE, fd_under_prefix(fd));
    return real_fallocate(fd, mode, offset, len);
}
int fallocate64(int fd, int mode, off_t offset, off_t len) {
    FAIL_IF(FALLOCATE, fd_under_prefix(fd));
    return real_fallocate64(fd, mode, offset, len);
}
/* posix_fallocate returns its error instead of setting errno. */
int posix_fallocate(int fd, off_t offset, off_t len) {
    if (should_fail(FALLOCATE, fd_under_prefix(fd))) return fail_errno;
    return real_posix_fallocate(fd, offset, len);
}
int posix_fallocate64(int fd, off_t offset, off_t len) {
    if (should_fail(FALLOCATE, fd_under_prefix(fd))) return fail_errno;
    return real_posix_fallocate64(fd, offset, len);
}
