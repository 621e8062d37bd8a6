/*
 * recording_io.c: an LD_PRELOAD shim that records every mutating file operation a process
 * makes under one directory, in the order they happen, for tests/powerloss/crash_states.py
 * to rebuild what a power cut at any point could have left on disk (in the spirit of ALICE,
 * Pillai et al., OSDI'14).
 *
 * Environment:
 *   RECORD_PREFIX  the directory to record (a data directory); resolved with realpath()
 *   RECORD_LOG     the log to append records to (outside RECORD_PREFIX)
 *   RECORD_ACKS    optional: a file outside RECORD_PREFIX whose writes are logged as marks
 *                  (type 'A', the bytes written): the workload writes "this write is
 *                  acknowledged" there, and the mark lands in the log in order with the I/O
 *
 * What is recorded, for paths under RECORD_PREFIX except files named "lock.mdb" or ending
 * in "-lock" (LMDB's lock file; it is rebuilt on open):
 *   open/open64/openat/openat64/creat/creat64 (and the _FORTIFY __open_2 forms) with O_CREAT
 *   or O_TRUNC; write, pwrite, pwrite64, writev, pwritev, pwritev64, pwritev2, pwritev64v2
 *   (the offset of write/writev is lseek(fd, 0, SEEK_CUR) before the call, or the size for
 *   O_APPEND; the bytes actually written are logged); sendfile, sendfile64, copy_file_range
 *   (the bytes are read back from the source with pread); ftruncate(64), truncate(64);
 *   fallocate(64), posix_fallocate(64); fsync and fdatasync of files and directories; sync,
 *   syncfs; rename, renameat, renameat2; unlink, unlinkat, rmdir; mkdir, mkdirat. What the
 *   model cannot replay under RECORD_PREFIX is logged as type 'X' so that the replayer
 *   refuses the log instead of modelling it wrongly: O_TMPFILE, link, linkat, symlink,
 *   symlinkat, RENAME_EXCHANGE, a rename into or out of the directory, and a shared writable
 *   mmap (LMDB's writemap, which the store never uses; its read-only map of data.mdb needs
 *   nothing).
 *
 * Every recorded call runs under one mutex together with the append of its record, so the
 * log's order is the order in which the calls took effect, across threads. Records are
 * appended with the real write (RTLD_NEXT), never through the wrappers. Calls glibc makes
 * internally (fopen, ...) bypass an LD_PRELOAD shim; neither Python's io nor LMDB use them.
 *
 * Log format: a sequence of records, little-endian, each a 64-byte header then three byte
 * strings:
 *
 *   offset size  field
 *   0      4     size       of the whole record, header included
 *   4      1     type       'C' create/truncating open, 'W' write, 'T' truncate,
 *                           'F' fallocate, 'S' fsync/fdatasync, 'Y' sync/syncfs, 'R' rename,
 *                           'U' unlink, 'M' mkdir, 'D' rmdir, 'A' mark, 'X' unsupported
 *   5      3     (zero)
 *   8      4     pid
 *   12     4     fd         the descriptor (C, W, T, F, S), or -1
 *   16     4     flags      C: 1 new file, 2 truncated an existing file; W: 1 O_SYNC/O_DSYNC
 *                           (durable when written); S: 1 directory, 2 fdatasync;
 *                           F: the fallocate mode
 *   20     4     (zero)
 *   24     8     ino        inode of the file (C, W, T, F, S, R: the source's, M)
 *   32     8     off        W: file offset; T: new size; F: offset
 *   40     8     len        F: length; W: bytes written
 *   48     4     path_len   the path (absolute, as the kernel names it for a descriptor)
 *   52     4     path2_len  R: the new path; X: what was not supported
 *   56     4     data_len   W: the bytes written; A: the mark
 *   60     4     (zero)
 *   64     ...   path, path2, data
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif
#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
#ifndef RWF_SYNC
#define RWF_SYNC 0x00000004
#endif

struct __attribute__((packed)) header {
    uint32_t size;
    uint8_t type;
    uint8_t pad1[3];
    int32_t pid;
    int32_t fd;
    uint32_t flags;
    uint32_t pad2;
    uint64_t ino;
    int64_t off;
    int64_t len;
    uint32_t path_len;
    uint32_t path2_len;
    uint32_t data_len;
    uint32_t pad3;
};

_Static_assert(sizeof(struct header) == 64, "the header is 64 bytes");

enum { IGNORED = 0, RECORDED = 1, ACKS = 2 };

static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static char prefix[PATH_MAX];
static size_t prefix_len;
static char acks[PATH_MAX];
static int log_fd = -1;

/* The real functions. */
static int (*real_openat64)(int, const char *, int, ...);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);
static ssize_t (*real_pwritev64v2)(int, const struct iovec *, int, off64_t, int);
static ssize_t (*real_sendfile64)(int, int, off64_t *, size_t);
static ssize_t (*real_copy_file_range)(int, off64_t *, int, off64_t *, size_t, unsigned int);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_truncate64)(const char *, off64_t);
static int (*real_fallocate64)(int, int, off64_t, off64_t);
static int (*real_posix_fallocate64)(int, off64_t, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static void (*real_sync)(void);
static int (*real_syncfs)(int);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_mkdirat)(int, const char *, mode_t);
static int (*real_linkat)(int, const char *, int, const char *, int);
static int (*real_symlinkat)(const char *, int, const char *);
static void *(*real_mmap64)(void *, size_t, int, int, int, off64_t);

/* *dir* "/" *name* into *out* (PATH_MAX bytes); a path too long for that stops the process. */
static void join_path(char *out, const char *dir, const char *name) {
    size_t a = strcmp(dir, "/") == 0 ? 0 : strlen(dir), b = strlen(name);
    if (a + 1 + b >= PATH_MAX) {
        fprintf(stderr, "recording_io: a path longer than PATH_MAX under %s\n", dir);
        abort();
    }
    memcpy(out, dir, a);
    out[a] = '/';
    memcpy(out + a + 1, name, b + 1);
}

static void *next(const char *name) {
    void *found = dlsym(RTLD_NEXT, name);
    if (found == NULL) {
        fprintf(stderr, "recording_io: no %s in the next library\n", name);
        abort();
    }
    return found;
}

static void *next_or_null(const char *name) { return dlsym(RTLD_NEXT, name); }

static void resolve(void) {
    real_openat64 = next("openat64");
    real_write = next("write");
    real_pwrite64 = next("pwrite64");
    real_writev = next("writev");
    real_pwritev64 = next("pwritev64");
    real_pwritev64v2 = next_or_null("pwritev64v2");
    real_sendfile64 = next("sendfile64");
    real_copy_file_range = next_or_null("copy_file_range");
    real_ftruncate64 = next("ftruncate64");
    real_truncate64 = next("truncate64");
    real_fallocate64 = next("fallocate64");
    real_posix_fallocate64 = next("posix_fallocate64");
    real_fsync = next("fsync");
    real_fdatasync = next("fdatasync");
    real_sync = next("sync");
    real_syncfs = next("syncfs");
    real_renameat2 = next_or_null("renameat2");
    real_renameat = next("renameat");
    real_unlinkat = next("unlinkat");
    real_mkdirat = next("mkdirat");
    real_linkat = next("linkat");
    real_symlinkat = next("symlinkat");
    real_mmap64 = next("mmap64");

    const char *want = getenv("RECORD_PREFIX");
    const char *log_path = getenv("RECORD_LOG");
    const char *acks_path = getenv("RECORD_ACKS");
    if (want == NULL || log_path == NULL) {
        return; /* not recording: every call goes straight through */
    }
    if (realpath(want, prefix) == NULL) {
        fprintf(stderr, "recording_io: RECORD_PREFIX %s: %s\n", want, strerror(errno));
        abort();
    }
    prefix_len = strlen(prefix);
    if (acks_path != NULL) {
        /* The marks file may not exist yet: resolve its directory. */
        char dir[PATH_MAX];
        const char *slash = strrchr(acks_path, '/');
        if (slash == NULL) {
            if (getcwd(dir, sizeof dir) == NULL) abort();
            join_path(acks, dir, acks_path);
        } else {
            char parent[PATH_MAX];
            snprintf(parent, sizeof parent, "%.*s", (int)(slash - acks_path), acks_path);
            if (realpath(parent[0] ? parent : "/", dir) == NULL) abort();
            join_path(acks, dir, slash + 1);
        }
    }
    log_fd = real_openat64(AT_FDCWD, log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log_fd < 0) {
        fprintf(stderr, "recording_io: RECORD_LOG %s: %s\n", log_path, strerror(errno));
        abort();
    }
}

static void init(void) { pthread_once(&once, resolve); }

__attribute__((constructor)) static void shim_constructor(void) { init(); }

/* --- classifying paths ------------------------------------------------------------------- */

static int ignored_name(const char *path) {
    char name[PATH_MAX];
    const char *slash = strrchr(path, '/');
    snprintf(name, sizeof name, "%s", slash ? slash + 1 : path);
    size_t n = strlen(name);
    const char *deleted = " (deleted)";
    size_t d = strlen(deleted);
    if (n > d && strcmp(name + n - d, deleted) == 0) {
        name[n - d] = '\0';
        n -= d;
    }
    if (strcmp(name, "lock.mdb") == 0) return 1;
    return n >= 5 && strcmp(name + n - 5, "-lock") == 0;
}

static int classify(const char *path) {
    if (log_fd < 0) return IGNORED;
    if (acks[0] && strcmp(path, acks) == 0) return ACKS;
    if (strncmp(path, prefix, prefix_len) != 0) return IGNORED;
    if (path[prefix_len] != '/' && path[prefix_len] != '\0') return IGNORED;
    return ignored_name(path) ? IGNORED : RECORDED;
}

/* The path the kernel has for *fd*, and what to do with its writes. */
static int fd_kind(int fd, char *out) {
    if (log_fd < 0 || fd < 0) return IGNORED;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n <= 0) return IGNORED;
    out[n] = '\0';
    return classify(out);
}

/* *path* (relative to *dirfd*) made absolute, its directory resolved with realpath(). */
static void absolute(int dirfd, const char *path, char *out) {
    char joined[PATH_MAX];
    if (path[0] == '/') {
        snprintf(joined, sizeof joined, "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (getcwd(base, sizeof base) == NULL) base[0] = '\0';
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            base[n > 0 ? n : 0] = '\0';
        }
        snprintf(joined, sizeof joined, "%s/%s", base, path);
    }
    size_t n = strlen(joined);
    while (n > 1 && joined[n - 1] == '/') joined[--n] = '\0';
    char *slash = strrchr(joined, '/');
    char parent[PATH_MAX], resolved[PATH_MAX];
    snprintf(parent, sizeof parent, "%.*s", (int)(slash - joined), joined);
    if (realpath(parent[0] ? parent : "/", resolved) != NULL) {
        join_path(out, resolved, slash + 1);
    } else {
        snprintf(out, PATH_MAX, "%s", joined);
    }
}

/* --- writing records ---------------------------------------------------------------------- */

static void write_fully(const struct iovec *iov, int count) {
    struct iovec parts[4];
    memcpy(parts, iov, sizeof(struct iovec) * count);
    int first = 0;
    while (first < count) {
        ssize_t n = real_writev(log_fd, parts + first, count - first);
        if (n < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "recording_io: writing the log: %s\n", strerror(errno));
            abort();
        }
        while (first < count && (size_t)n >= parts[first].iov_len) {
            n -= parts[first].iov_len;
            first++;
        }
        if (first < count) {
            parts[first].iov_base = (char *)parts[first].iov_base + n;
            parts[first].iov_len -= n;
        }
    }
}

/* Append one record; call holding the mutex. */
static void emit(char type, int fd, uint32_t flags, uint64_t ino, int64_t off, int64_t len,
                 const char *path, const char *path2, const void *data, size_t data_len) {
    struct header h;
    memset(&h, 0, sizeof h);
    size_t path_len = path ? strlen(path) : 0, path2_len = path2 ? strlen(path2) : 0;
    h.size = (uint32_t)(sizeof h + path_len + path2_len + data_len);
    h.type = (uint8_t)type;
    h.pid = getpid();
    h.fd = fd;
    h.flags = flags;
    h.ino = ino;
    h.off = off;
    h.len = len;
    h.path_len = (uint32_t)path_len;
    h.path2_len = (uint32_t)path2_len;
    h.data_len = (uint32_t)data_len;
    struct iovec iov[4] = {
        {&h, sizeof h},
        {(void *)(path ? path : ""), path_len},
        {(void *)(path2 ? path2 : ""), path2_len},
        {(void *)(data ? data : ""), data_len},
    };
    write_fully(iov, 4);
}

static uint64_t fd_ino(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

static uint64_t path_ino(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

static void unsupported(const char *path, const char *what) {
    emit('X', -1, 0, 0, 0, 0, path, what, NULL, 0);
}

/* Where a write() or writev() on *fd* goes: its offset, or its size under O_APPEND. */
static off64_t write_offset(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_APPEND)) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : -1;
    }
    return lseek64(fd, 0, SEEK_CUR);
}

static uint32_t sync_flag(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return (fl >= 0 && (fl & (O_SYNC | O_DSYNC))) ? 1 : 0;
}

static void log_write(int kind, int fd, const char *path, off64_t off, const void *data,
                      size_t n, uint32_t flags) {
    if (kind == ACKS) {
        emit('A', fd, 0, 0, 0, (int64_t)n, path, NULL, data, n);
    } else {
        emit('W', fd, flags | sync_flag(fd), fd_ino(fd), off, (int64_t)n, path, NULL, data, n);
    }
}

/* The first *n* bytes of *iov*, gathered (the caller frees them). */
static void *gather(const struct iovec *iov, int count, size_t n) {
    char *buf = malloc(n ? n : 1);
    if (buf == NULL) abort();
    size_t done = 0;
    for (int i = 0; i < count && done < n; i++) {
        size_t take = iov[i].iov_len < n - done ? iov[i].iov_len : n - done;
        memcpy(buf + done, iov[i].iov_base, take);
        done += take;
    }
    return buf;
}

/* --- open ---------------------------------------------------------------------------------- */

static int open_common(int dirfd, const char *path, int flags, mode_t mode) {
    init();
    int creating = (flags & O_CREAT) || (flags & O_TRUNC) || ((flags & O_TMPFILE) == O_TMPFILE);
    if (!creating || log_fd < 0 || path == NULL) return real_openat64(dirfd, path, flags, mode);
    char where[PATH_MAX];
    absolute(dirfd, path, where);
    if (classify(where) != RECORDED) return real_openat64(dirfd, path, flags, mode);
    pthread_mutex_lock(&mutex);
    struct stat before;
    int existed = fstatat(dirfd, path, &before, 0) == 0;
    int fd = real_openat64(dirfd, path, flags, mode);
    int saved = errno;
    if (fd >= 0) {
        if ((flags & O_TMPFILE) == O_TMPFILE) {
            unsupported(where, "O_TMPFILE");
        } else {
            char named[PATH_MAX];
            if (fd_kind(fd, named) == IGNORED) snprintf(named, sizeof named, "%s", where);
            int truncated = existed && (flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY;
            uint32_t f = (existed ? 0 : 1) | (truncated ? 2 : 0);
            if (f) emit('C', fd, f, fd_ino(fd), 0, 0, named, NULL, NULL, 0);
        }
    }
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) return (mode_t)va_arg(ap, int);
    return 0;
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_common(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_common(AT_FDCWD, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_common(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_common(dirfd, path, flags, mode);
}

int __open_2(const char *path, int flags) { return open_common(AT_FDCWD, path, flags, 0); }
int __open64_2(const char *path, int flags) { return open_common(AT_FDCWD, path, flags, 0); }
int __openat_2(int dirfd, const char *path, int flags) {
    return open_common(dirfd, path, flags, 0);
}
int __openat64_2(int dirfd, const char *path, int flags) {
    return open_common(dirfd, path, flags, 0);
}

int creat(const char *path, mode_t mode) {
    return open_common(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

int creat64(const char *path, mode_t mode) {
    return open_common(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

/* --- writes -------------------------------------------------------------------------------- */

ssize_t write(int fd, const void *buf, size_t n) {
    init();
    char path[PATH_MAX];
    int kind = fd_kind(fd, path);
    if (kind == IGNORED) return real_write(fd, buf, n);
    pthread_mutex_lock(&mutex);
    off64_t off = kind == RECORDED ? write_offset(fd) : 0;
    ssize_t r = real_write(fd, buf, n);
    int saved = errno;
    if (r > 0) log_write(kind, fd, path, off, buf, (size_t)r, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

static ssize_t pwrite_common(int fd, const void *buf, size_t n, off64_t off) {
    init();
    char path[PATH_MAX];
    int kind = fd_kind(fd, path);
    if (kind == IGNORED) return real_pwrite64(fd, buf, n, off);
    pthread_mutex_lock(&mutex);
    ssize_t r = real_pwrite64(fd, buf, n, off);
    int saved = errno;
    if (r > 0) log_write(kind, fd, path, off, buf, (size_t)r, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    return pwrite_common(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    return pwrite_common(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    init();
    char path[PATH_MAX];
    int kind = fd_kind(fd, path);
    if (kind == IGNORED) return real_writev(fd, iov, count);
    pthread_mutex_lock(&mutex);
    off64_t off = kind == RECORDED ? write_offset(fd) : 0;
    ssize_t r = real_writev(fd, iov, count);
    int saved = errno;
    if (r > 0) {
        void *data = gather(iov, count, (size_t)r);
        log_write(kind, fd, path, off, data, (size_t)r, 0);
        free(data);
    }
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

static ssize_t pwritev_common(int fd, const struct iovec *iov, int count, off64_t off,
                              int rwf, int v2) {
    init();
    char path[PATH_MAX];
    int kind = fd_kind(fd, path);
    if (kind == IGNORED || (v2 && real_pwritev64v2 == NULL)) {
        if (v2) {
            if (real_pwritev64v2 == NULL) {
                errno = ENOSYS;
                return -1;
            }
            return real_pwritev64v2(fd, iov, count, off, rwf);
        }
        return real_pwritev64(fd, iov, count, off);
    }
    pthread_mutex_lock(&mutex);
    off64_t at = off == -1 ? write_offset(fd) : off;
    ssize_t r = v2 ? real_pwritev64v2(fd, iov, count, off, rwf)
                   : real_pwritev64(fd, iov, count, off);
    int saved = errno;
    if (r > 0) {
        void *data = gather(iov, count, (size_t)r);
        log_write(kind, fd, path, at, data, (size_t)r, (rwf & (RWF_DSYNC | RWF_SYNC)) ? 1 : 0);
        free(data);
    }
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t off) {
    return pwritev_common(fd, iov, count, off, 0, 0);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int count, off64_t off) {
    return pwritev_common(fd, iov, count, off, 0, 0);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int count, off_t off, int rwf) {
    return pwritev_common(fd, iov, count, off, rwf, 1);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int count, off64_t off, int rwf) {
    return pwritev_common(fd, iov, count, off, rwf, 1);
}

/* sendfile and copy_file_range: the bytes are read back from the source. */
static void log_copied(int kind, int out_fd, const char *path, off64_t out_off, int in_fd,
                       off64_t in_off, ssize_t n) {
    if (n <= 0) return;
    char *buf = malloc((size_t)n);
    if (buf == NULL) abort();
    ssize_t got = pread64(in_fd, buf, (size_t)n, in_off);
    if (got != n) {
        unsupported(path, "sendfile/copy_file_range whose source could not be read back");
    } else {
        log_write(kind, out_fd, path, out_off, buf, (size_t)n, 0);
    }
    free(buf);
}

static ssize_t sendfile_common(int out_fd, int in_fd, off64_t *offset, size_t count) {
    init();
    char path[PATH_MAX];
    int kind = fd_kind(out_fd, path);
    if (kind == IGNORED) return real_sendfile64(out_fd, in_fd, offset, count);
    pthread_mutex_lock(&mutex);
    off64_t out_off = write_offset(out_fd);
    off64_t in_off = offset ? *offset : lseek64(in_fd, 0, SEEK_CUR);
    ssize_t r = real_sendfile64(out_fd, in_fd, offset, count);
    int saved = errno;
    log_copied(kind, out_fd, path, out_off, in_fd, in_off, r);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
    if (offset == NULL) return sendfile_common(out_fd, in_fd, NULL, count);
    off64_t off = *offset;
    ssize_t r = sendfile_common(out_fd, in_fd, &off, count);
    *offset = (off_t)off;
    return r;
}

ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count) {
    return sendfile_common(out_fd, in_fd, offset, count);
}

ssize_t copy_file_range(int in_fd, off64_t *in_off, int out_fd, off64_t *out_off, size_t len,
                        unsigned int flags) {
    init();
    if (real_copy_file_range == NULL) {
        errno = ENOSYS;
        return -1;
    }
    char path[PATH_MAX];
    int kind = fd_kind(out_fd, path);
    if (kind == IGNORED) return real_copy_file_range(in_fd, in_off, out_fd, out_off, len, flags);
    pthread_mutex_lock(&mutex);
    off64_t at_out = out_off ? *out_off : write_offset(out_fd);
    off64_t at_in = in_off ? *in_off : lseek64(in_fd, 0, SEEK_CUR);
    ssize_t r = real_copy_file_range(in_fd, in_off, out_fd, out_off, len, flags);
    int saved = errno;
    log_copied(kind, out_fd, path, at_out, in_fd, at_in, r);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

/* --- sizes ---------------------------------------------------------------------------------- */

static int ftruncate_common(int fd, off64_t size) {
    init();
    char path[PATH_MAX];
    if (fd_kind(fd, path) != RECORDED) return real_ftruncate64(fd, size);
    pthread_mutex_lock(&mutex);
    int r = real_ftruncate64(fd, size);
    int saved = errno;
    if (r == 0) emit('T', fd, 0, fd_ino(fd), size, 0, path, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int ftruncate(int fd, off_t size) { return ftruncate_common(fd, size); }
int ftruncate64(int fd, off64_t size) { return ftruncate_common(fd, size); }

static int truncate_common(const char *path, off64_t size) {
    init();
    char where[PATH_MAX];
    if (log_fd < 0) return real_truncate64(path, size);
    absolute(AT_FDCWD, path, where);
    if (classify(where) != RECORDED) return real_truncate64(path, size);
    pthread_mutex_lock(&mutex);
    int r = real_truncate64(path, size);
    int saved = errno;
    if (r == 0) emit('T', -1, 0, path_ino(where), size, 0, where, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int truncate(const char *path, off_t size) { return truncate_common(path, size); }
int truncate64(const char *path, off64_t size) { return truncate_common(path, size); }

static int fallocate_common(int fd, int mode, off64_t off, off64_t len, int posix) {
    init();
    char path[PATH_MAX];
    if (fd_kind(fd, path) != RECORDED) {
        return posix ? real_posix_fallocate64(fd, off, len) : real_fallocate64(fd, mode, off, len);
    }
    pthread_mutex_lock(&mutex);
    int r = posix ? real_posix_fallocate64(fd, off, len) : real_fallocate64(fd, mode, off, len);
    int saved = errno;
    if (r == 0) emit('F', fd, (uint32_t)mode, fd_ino(fd), off, len, path, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int fallocate(int fd, int mode, off_t off, off_t len) {
    return fallocate_common(fd, mode, off, len, 0);
}
int fallocate64(int fd, int mode, off64_t off, off64_t len) {
    return fallocate_common(fd, mode, off, len, 0);
}
int posix_fallocate(int fd, off_t off, off_t len) { return fallocate_common(fd, 0, off, len, 1); }
int posix_fallocate64(int fd, off64_t off, off64_t len) {
    return fallocate_common(fd, 0, off, len, 1);
}

/* --- syncs ---------------------------------------------------------------------------------- */

static int sync_common(int fd, int datasync) {
    init();
    char path[PATH_MAX];
    if (fd_kind(fd, path) != RECORDED) return datasync ? real_fdatasync(fd) : real_fsync(fd);
    pthread_mutex_lock(&mutex);
    int r = datasync ? real_fdatasync(fd) : real_fsync(fd);
    int saved = errno;
    if (r == 0) {
        struct stat st;
        memset(&st, 0, sizeof st);
        int dir = fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
        emit('S', fd, (dir ? 1 : 0) | (datasync ? 2 : 0), (uint64_t)st.st_ino, 0, 0, path, NULL,
             NULL, 0);
    }
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int fsync(int fd) { return sync_common(fd, 0); }
int fdatasync(int fd) { return sync_common(fd, 1); }

void sync(void) {
    init();
    if (log_fd < 0) {
        real_sync();
        return;
    }
    pthread_mutex_lock(&mutex);
    real_sync();
    emit('Y', -1, 0, 0, 0, 0, prefix, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
}

int syncfs(int fd) {
    init();
    if (log_fd < 0) return real_syncfs(fd);
    pthread_mutex_lock(&mutex);
    int r = real_syncfs(fd);
    int saved = errno;
    if (r == 0) emit('Y', fd, 0, 0, 0, 0, prefix, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

/* --- names ---------------------------------------------------------------------------------- */

static int rename_common(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                         unsigned int flags, int v2) {
    init();
    if (log_fd < 0) {
        return v2 ? real_renameat2(olddirfd, oldpath, newdirfd, newpath, flags)
                  : real_renameat(olddirfd, oldpath, newdirfd, newpath);
    }
    char from[PATH_MAX], to[PATH_MAX];
    absolute(olddirfd, oldpath, from);
    absolute(newdirfd, newpath, to);
    int a = classify(from) == RECORDED, b = classify(to) == RECORDED;
    if (!a && !b) {
        return v2 ? real_renameat2(olddirfd, oldpath, newdirfd, newpath, flags)
                  : real_renameat(olddirfd, oldpath, newdirfd, newpath);
    }
    pthread_mutex_lock(&mutex);
    uint64_t ino = path_ino(from);
    int r = v2 ? real_renameat2(olddirfd, oldpath, newdirfd, newpath, flags)
               : real_renameat(olddirfd, oldpath, newdirfd, newpath);
    int saved = errno;
    if (r == 0) {
        if (!a || !b) {
            unsupported(a ? from : to, "a rename into or out of the recorded directory");
        } else if (flags & RENAME_EXCHANGE) {
            unsupported(from, "RENAME_EXCHANGE");
        } else {
            emit('R', -1, flags, ino, 0, 0, from, to, NULL, 0);
        }
    }
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int rename(const char *oldpath, const char *newpath) {
    return rename_common(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0, 0);
}

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    return rename_common(olddirfd, oldpath, newdirfd, newpath, 0, 0);
}

int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
              unsigned int flags) {
    if (real_renameat2 == NULL) {
        init();
        if (real_renameat2 == NULL) {
            errno = ENOSYS;
            return -1;
        }
    }
    return rename_common(olddirfd, oldpath, newdirfd, newpath, flags, 1);
}

static int unlink_common(int dirfd, const char *path, int flags) {
    init();
    if (log_fd < 0) return real_unlinkat(dirfd, path, flags);
    char where[PATH_MAX];
    absolute(dirfd, path, where);
    if (classify(where) != RECORDED) return real_unlinkat(dirfd, path, flags);
    pthread_mutex_lock(&mutex);
    int r = real_unlinkat(dirfd, path, flags);
    int saved = errno;
    if (r == 0) emit((flags & AT_REMOVEDIR) ? 'D' : 'U', -1, 0, 0, 0, 0, where, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int unlink(const char *path) { return unlink_common(AT_FDCWD, path, 0); }
int unlinkat(int dirfd, const char *path, int flags) { return unlink_common(dirfd, path, flags); }
int rmdir(const char *path) { return unlink_common(AT_FDCWD, path, AT_REMOVEDIR); }

static int mkdir_common(int dirfd, const char *path, mode_t mode) {
    init();
    if (log_fd < 0) return real_mkdirat(dirfd, path, mode);
    char where[PATH_MAX];
    absolute(dirfd, path, where);
    if (classify(where) != RECORDED) return real_mkdirat(dirfd, path, mode);
    pthread_mutex_lock(&mutex);
    int r = real_mkdirat(dirfd, path, mode);
    int saved = errno;
    if (r == 0) emit('M', -1, 0, path_ino(where), 0, 0, where, NULL, NULL, 0);
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

int mkdir(const char *path, mode_t mode) { return mkdir_common(AT_FDCWD, path, mode); }
int mkdirat(int dirfd, const char *path, mode_t mode) { return mkdir_common(dirfd, path, mode); }

static int link_common(int newdirfd, const char *newpath, int (*call)(void *), void *args) {
    init();
    if (log_fd < 0) return call(args);
    char where[PATH_MAX];
    absolute(newdirfd, newpath, where);
    if (classify(where) != RECORDED) return call(args);
    pthread_mutex_lock(&mutex);
    int r = call(args);
    int saved = errno;
    if (r == 0) unsupported(where, "a hard or symbolic link");
    pthread_mutex_unlock(&mutex);
    errno = saved;
    return r;
}

struct link_args {
    int olddirfd;
    const char *oldpath;
    int newdirfd;
    const char *newpath;
    int flags;
};

static int call_linkat(void *p) {
    struct link_args *a = p;
    return real_linkat(a->olddirfd, a->oldpath, a->newdirfd, a->newpath, a->flags);
}

static int call_symlinkat(void *p) {
    struct link_args *a = p;
    return real_symlinkat(a->oldpath, a->newdirfd, a->newpath);
}

int link(const char *oldpath, const char *newpath) {
    struct link_args a = {AT_FDCWD, oldpath, AT_FDCWD, newpath, 0};
    return link_common(AT_FDCWD, newpath, call_linkat, &a);
}

int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags) {
    struct link_args a = {olddirfd, oldpath, newdirfd, newpath, flags};
    return link_common(newdirfd, newpath, call_linkat, &a);
}

int symlink(const char *target, const char *linkpath) {
    struct link_args a = {AT_FDCWD, target, AT_FDCWD, linkpath, 0};
    return link_common(AT_FDCWD, linkpath, call_symlinkat, &a);
}

int symlinkat(const char *target, int newdirfd, const char *linkpath) {
    struct link_args a = {AT_FDCWD, target, newdirfd, linkpath, 0};
    return link_common(newdirfd, linkpath, call_symlinkat, &a);
}

/* --- maps ----------------------------------------------------------------------------------- */

static void *mmap_common(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    init();
    if (fd >= 0 && (prot & PROT_WRITE) && (flags & MAP_SHARED)) {
        char path[PATH_MAX];
        if (fd_kind(fd, path) == RECORDED) {
            pthread_mutex_lock(&mutex);
            unsupported(path, "a shared writable mmap (its writes are not seen)");
            pthread_mutex_unlock(&mutex);
        }
    }
    return real_mmap64(addr, len, prot, flags, fd, off);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    return mmap_common(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    return mmap_common(addr, len, prot, flags, fd, off);
}
