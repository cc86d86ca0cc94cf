/*
 * execq-launch: apply a command's rlimits, private mounts, identity and parent-death signal,
 * drop every capability, then exec it.
 *
 * One exec instead of two (`prlimit` then `setpriv`): measured here, 1.2 ms of CPU and of
 * wall time less per command. Python cannot do this between fork and exec without
 * preexec_fn, which forces a full fork() of the pool process.
 *
 *   execq-launch [--rlimit NAME=SOFT:HARD]... [--mount FD:DIR] [--read-only PATH]...
 *                [--uid UID --gid GID] [--pdeathsig] [--scope-signals] [--no-sockets]
 *                [--keep-caps] -- PROG ARG...
 *
 * NAME is cpu, fsize, nofile, core, as or nproc; SOFT and HARD are numbers or "unlimited".
 * --mount FD:DIR and --read-only PATH: in a mount namespace of its own (private: nothing
 * propagates back to the host), attach the detached mount FD (made by the worker with
 * fsmount(2): the command's size-limited tmpfs) on DIR and enter it, and make PATH and every
 * mount under it read-only. FD is closed before the exec.
 * --uid/--gid: no supplementary groups, real/effective/saved ids switched.
 * Capabilities: unless --keep-caps (a step before unshare or bwrap, which need them), every
 * one is dropped after the steps above: securebits NOROOT and NO_SETUID_FIXUP (locked) so
 * that no exec, of a setuid-root program or of anything as uid 0, gives any back; the
 * bounding, ambient, inheritable, permitted and effective sets emptied; no_new_privs set.
 * (Securebits and bounding set need CAP_SETPCAP: without it no_new_privs does their work.)
 * --pdeathsig: SIGKILL when the parent dies, set after the switch (a change of credentials
 * clears it).
 * --scope-signals: a Landlock domain: PROG and its descendants cannot signal or ptrace any
 * process outside it (signals are otherwise checked by uid alone: uid 0, capabilities or
 * not, reaches every root process).
 * --no-sockets: the last step before exec, a seccomp filter (inherited by everything PROG
 * starts, irremovable) refusing every way to open or reach a socket; see sockets_filter().
 * Exit status 126 when something cannot be applied (the message names it), 127 when PROG
 * cannot be executed; otherwise PROG's own.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/securebits.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__ILP32__)
#error "build execq-launch for x86_64 proper, not x32"
#elif defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__i386__)
#define NATIVE_ARCH AUDIT_ARCH_I386
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#elif defined(__riscv) && __riscv_xlen == 64
#define NATIVE_ARCH AUDIT_ARCH_RISCV64
#elif defined(__powerpc64__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NATIVE_ARCH AUDIT_ARCH_PPC64LE
#elif defined(__s390x__)
#define NATIVE_ARCH AUDIT_ARCH_S390X
#endif

#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif
/* Numbers shared by every architecture since Linux 5.1; older headers may lack them. */
#ifndef __NR_move_mount
#define __NR_move_mount 429
#endif
#ifndef __NR_mount_setattr
#define __NR_mount_setattr 442
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_restrict_self 446
#endif
#define MOVE_MOUNT_EMPTY_PATH 0x00000004 /* MOVE_MOUNT_F_EMPTY_PATH of linux/mount.h */
#define MOUNT_ATTR_READ_ONLY 0x00000001ULL /* MOUNT_ATTR_RDONLY */
#define LANDLOCK_SIGNAL 0x2ULL /* LANDLOCK_SCOPE_SIGNAL, Landlock ABI 6 (Linux 6.12) */
#define MAX_READ_ONLY 16

static void die(const char *what, const char *detail) {
    fprintf(stderr, "execq-launch: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    _exit(126);
}

/* die() for a failed call on a path: "WHAT PATH: strerror". */
static void die_on(const char *what, const char *path) {
    char detail[512];
    snprintf(detail, sizeof detail, "%s: %s", path, strerror(errno));
    die(what, detail);
}

static int resource_of(const char *name) {
    static const struct { const char *name; int resource; } known[] = {
        {"cpu", RLIMIT_CPU}, {"fsize", RLIMIT_FSIZE}, {"nofile", RLIMIT_NOFILE},
        {"core", RLIMIT_CORE}, {"as", RLIMIT_AS}, {"nproc", RLIMIT_NPROC},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(name, known[i].name) == 0) return known[i].resource;
    die("unknown rlimit", name);
    return -1;
}

static rlim_t limit_of(const char *text, const char *spec) {
    if (strcmp(text, "unlimited") == 0) return RLIM_INFINITY;
    char *end = NULL;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-') die("bad rlimit value", spec);
    return (rlim_t)value;
}

static void apply_rlimit(char *spec) {
    char copy[128];
    if (strlen(spec) >= sizeof copy) die("rlimit too long", spec);
    strcpy(copy, spec);
    char *eq = strchr(copy, '='), *colon = eq ? strchr(eq, ':') : NULL;
    if (!eq || !colon) die("rlimit is not NAME=SOFT:HARD", spec);
    *eq = '\0';
    *colon = '\0';
    struct rlimit limit = {limit_of(eq + 1, spec), limit_of(colon + 1, spec)};
    if (setrlimit(resource_of(copy), &limit) != 0) die("setrlimit", spec);
}

static long id_of(const char *text, const char *option) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value <= 0 || value > 0x7fffffffL) die("bad id for", option);
    return value;
}

static int fd_of(const char *text, const char *spec) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end != ':' || value < 3 || value > 0x7fffffffL)
        die("--mount is not FD:DIR", spec);
    return (int)value;
}

/* A mount point as /proc/self/mountinfo writes it: space, tab, newline and \ as \ooo. */
static void unescape(char *text) {
    char *out = text;
    for (char *in = text; *in; out++) {
        if (in[0] == '\\' && in[1] >= '0' && in[1] <= '3' && in[2] >= '0' && in[2] <= '7' &&
            in[3] >= '0' && in[3] <= '7') {
            *out = (char)((in[1] - '0') * 64 + (in[2] - '0') * 8 + (in[3] - '0'));
            in += 4;
        } else {
            *out = *in++;
        }
    }
    *out = '\0';
}

/* The per-mount flags a bind remount would otherwise reset. */
static unsigned long kept_flags(unsigned long f) {
    return (f & ST_NOSUID ? MS_NOSUID : 0) | (f & ST_NODEV ? MS_NODEV : 0) |
           (f & ST_NOEXEC ? MS_NOEXEC : 0) | (f & ST_NOATIME ? MS_NOATIME : 0) |
           (f & ST_NODIRATIME ? MS_NODIRATIME : 0) | (f & ST_RELATIME ? MS_RELATIME : 0);
}

/* Calls fn on PATH and every mount point under it. */
static void each_mount_under(const char *path, void (*fn)(const char *)) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) die("/proc/self/mountinfo", strerror(errno));
    size_t len = strlen(path), cap = 0;
    char *line = NULL;
    while (getline(&line, &cap, f) > 0) {
        char *point = line; /* the fifth field */
        for (int k = 0; k < 4 && point; k++) {
            point = strchr(point, ' ');
            if (point) point++;
        }
        char *end = point ? strchr(point, ' ') : NULL;
        if (!end) continue;
        *end = '\0';
        unescape(point);
        if (strncmp(point, path, len) == 0 && (point[len] == '\0' || point[len] == '/'))
            fn(point);
    }
    free(line);
    fclose(f);
}

static void remount_read_only(const char *point) {
    struct statvfs st;
    if (statvfs(point, &st) != 0) die_on("statvfs", point);
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | kept_flags(st.f_flag);
    /* EINVAL: no longer a mount point (covered by another one): checked below. */
    if (mount(NULL, point, NULL, flags, NULL) != 0 && errno != EINVAL) die_on("read-only", point);
}

static void check_read_only(const char *point) {
    struct statvfs st;
    if (statvfs(point, &st) != 0 || !(st.f_flag & ST_RDONLY)) die("still writable", point);
}

/* PATH and every mount under it read-only (in our own namespace: the host's are untouched).
 * One mount_setattr() where the kernel has it (5.12), a remount per mount otherwise. */
static void read_only(const char *path) {
    struct { uint64_t set, clear, propagation, userns; } attr = {MOUNT_ATTR_READ_ONLY, 0, 0, 0};
    long done = syscall(__NR_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &attr, sizeof attr);
    if (done != 0 && errno == EINVAL) {
        /* Not a mount of its own (/proc/sys): make it one. */
        if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) != 0) die_on("bind", path);
        done = syscall(__NR_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &attr, sizeof attr);
    }
    if (done == 0) {
        check_read_only(path); /* the whole tree or nothing: mount_setattr() is atomic */
    } else if (errno == ENOSYS) {
        if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) != 0) die_on("bind", path);
        each_mount_under(path, remount_read_only);
        each_mount_under(path, check_read_only);
    } else {
        die_on("read-only", path);
    }
}

/* The command's own mount namespace: its private tmpfs, and kernel files read-only. */
static void private_mounts(int fd, const char *dir, char **paths, int n_read_only) {
    if (unshare(CLONE_NEWNS) != 0) die("unshare(CLONE_NEWNS)", strerror(errno));
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        die("private mount propagation", strerror(errno));
    if (fd >= 0) {
        if (syscall(__NR_move_mount, fd, "", AT_FDCWD, dir, MOVE_MOUNT_EMPTY_PATH) != 0)
            die_on("move_mount to", dir);
        close(fd);
        /* The working directory was the directory under the mount: step into the mount. */
        if (chdir(dir) != 0) die_on("chdir", dir);
    }
    for (int k = 0; k < n_read_only; k++) read_only(paths[k]);
}

static int has_effective(int cap) {
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0, 0, 0}, {0, 0, 0}};
    if (syscall(SYS_capget, &head, data) != 0) die("capget", strerror(errno));
    return (data[cap / 32].effective >> (cap % 32)) & 1;
}

/* Before the uid switch, while CAP_SETPCAP is still there: no exec (setuid-root program or
 * anything as uid 0) grants capabilities again, and changing uid keeps the sets as they are
 * until drop_capabilities() empties them. */
static void lock_securebits_and_bounding_set(void) {
    int bits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP |
               SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED |
               SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    if (prctl(PR_SET_SECUREBITS, bits, 0, 0, 0) != 0) die("securebits", strerror(errno));
    for (int cap = 0; cap < 64; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0) continue;
        if (errno == EINVAL) break; /* past the kernel's last capability */
        die("emptying the bounding set", strerror(errno));
    }
}

static void drop_capabilities(void) {
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0, 0, 0}, {0, 0, 0}};
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        die("clearing ambient capabilities", strerror(errno));
    if (syscall(SYS_capset, &head, data) != 0) die("capset", strerror(errno));
    if (syscall(SYS_capget, &head, data) != 0) die("capget", strerror(errno));
    for (int k = 0; k < 2; k++)
        if (data[k].effective || data[k].permitted || data[k].inheritable)
            die("capabilities left after capset", NULL);
    /* With it, no exec grants more than the (empty) permitted set: not as uid 0, not of a
     * setuid or file-capability program, whatever the bounding set still holds. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", strerror(errno));
}

/* Needs no_new_privs (set just before). */
static void scope_signals(void) {
    struct { uint64_t handled_access_fs, handled_access_net, scoped; } attr = {0, 0, 0};
    attr.scoped = LANDLOCK_SIGNAL;
    long fd = syscall(__NR_landlock_create_ruleset, &attr, sizeof attr, 0);
    if (fd < 0) die("landlock ruleset", strerror(errno));
    if (syscall(__NR_landlock_restrict_self, fd, 0) != 0) die("landlock", strerror(errno));
    close((int)fd);
}

#ifdef NATIVE_ARCH
#define ARG_LOW(n) (offsetof(struct seccomp_data, args[n]) + (BYTE_ORDER == BIG_ENDIAN ? 4 : 0))
#define LOAD(where) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (where))
#define REFUSE_IF(nr, err) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), \
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err))
#define RETURN(action) BPF_STMT(BPF_RET | BPF_K, (action))

/*
 * A network namespace leaves every socket of the filesystem (PostgreSQL's, docker.sock)
 * reachable, so: no socket(), no connect() (EACCES), and none of the ways around them:
 * io_uring (its own socket and connect operations, unseen by seccomp), pidfd_getfd (another
 * process's socket), socketcall (the multiplexer on 32-bit x86 and others). socketpair()
 * stays, for stream and seqpacket pairs only: a datagram pair's sendto()/sendmsg() may name
 * any socket file as its destination. Other ABIs of the same CPU (i386 and x32 calls on
 * x86_64) would dodge the numbers checked here: the process is killed instead.
 */
static void sockets_filter(void) {
    struct sock_filter code[] = {
        LOAD(offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0),
        RETURN(SECCOMP_RET_KILL_PROCESS),
        LOAD(offsetof(struct seccomp_data, nr)),
#ifdef __x86_64__
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
        RETURN(SECCOMP_RET_KILL_PROCESS),
#endif
        REFUSE_IF(__NR_socket, EACCES),
        REFUSE_IF(__NR_connect, EACCES),
#ifdef __NR_socketcall
        REFUSE_IF(__NR_socketcall, EACCES),
#endif
#ifdef __NR_io_uring_setup
        REFUSE_IF(__NR_io_uring_setup, EPERM),
        REFUSE_IF(__NR_io_uring_enter, EPERM),
        REFUSE_IF(__NR_io_uring_register, EPERM),
#endif
#ifdef __NR_pidfd_getfd
        REFUSE_IF(__NR_pidfd_getfd, EPERM),
#endif
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socketpair, 1, 0),
        RETURN(SECCOMP_RET_ALLOW),
        LOAD(ARG_LOW(1)),
        BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0xf), /* the type without SOCK_CLOEXEC/NONBLOCK */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SOCK_STREAM, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SOCK_SEQPACKET, 1, 0),
        RETURN(SECCOMP_RET_ERRNO | EACCES),
        RETURN(SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {(unsigned short)(sizeof code / sizeof code[0]), code};
    /* Required to install a filter without CAP_SYS_ADMIN; harmless (and wanted) for root. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", strerror(errno));
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0)
        die("seccomp filter", strerror(errno));
}
#else
static void sockets_filter(void) { die("--no-sockets is not supported on this architecture", NULL); }
#endif

int main(int argc, char **argv) {
    pid_t parent = getppid();
    long uid = -1, gid = -1;
    int pdeathsig = 0, no_sockets = 0, keep_caps = 0, signals = 0, mount_fd = -1, n_ro = 0, i = 1;
    const char *mount_dir = NULL;
    char *ro_paths[MAX_READ_ONLY];
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strcmp(argv[i], "--rlimit") == 0 && i + 1 < argc) {
            apply_rlimit(argv[++i]);
        } else if (strcmp(argv[i], "--uid") == 0 && i + 1 < argc) {
            uid = id_of(argv[++i], "--uid");
        } else if (strcmp(argv[i], "--gid") == 0 && i + 1 < argc) {
            gid = id_of(argv[++i], "--gid");
        } else if (strcmp(argv[i], "--mount") == 0 && i + 1 < argc && mount_fd < 0) {
            i++;
            mount_fd = fd_of(argv[i], argv[i]);
            mount_dir = strchr(argv[i], ':') + 1;
            if (mount_dir[0] != '/') die("--mount needs an absolute DIR", argv[i]);
        } else if (strcmp(argv[i], "--read-only") == 0 && i + 1 < argc && n_ro < MAX_READ_ONLY) {
            ro_paths[n_ro++] = argv[++i];
            if (argv[i][0] != '/') die("--read-only needs an absolute path", argv[i]);
        } else if (strcmp(argv[i], "--pdeathsig") == 0) {
            pdeathsig = 1;
        } else if (strcmp(argv[i], "--no-sockets") == 0) {
            no_sockets = 1;
        } else if (strcmp(argv[i], "--scope-signals") == 0) {
            signals = 1;
        } else if (strcmp(argv[i], "--keep-caps") == 0) {
            keep_caps = 1;
        } else {
            die("unknown option", argv[i]);
        }
    }
    if (i + 1 >= argc) die("no program after --", NULL);
    if ((uid < 0) != (gid < 0)) die("--uid and --gid go together", NULL);
    if (mount_fd >= 0 || n_ro > 0) private_mounts(mount_fd, mount_dir, ro_paths, n_ro);
    /* Without CAP_SETPCAP (a worker that is not root, or a container that dropped it) the
     * securebits and the bounding set stay: no_new_privs alone keeps every exec empty. */
    if (!keep_caps && has_effective(CAP_SETPCAP)) lock_securebits_and_bounding_set();
    if (uid >= 0) {
        if (setgroups(0, NULL) != 0) die("setgroups", strerror(errno));
        if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0) die("setresgid", strerror(errno));
        if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) die("setresuid", strerror(errno));
        uid_t r, e, s;
        if (getresuid(&r, &e, &s) != 0 || r != (uid_t)uid || e != (uid_t)uid || s != (uid_t)uid)
            die("the uid did not change", NULL);
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", strerror(errno));
    }
    if (!keep_caps) drop_capabilities();
    if (pdeathsig) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("pdeathsig", strerror(errno));
        /* The parent may have died before the signal was armed: then nobody waits for us. */
        if (getppid() != parent) _exit(137);
    }
    if (signals) {
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", strerror(errno));
        scope_signals();
    }
    /* Last: from here on, PROG and everything it starts are bound by it, with no way out. */
    if (no_sockets) sockets_filter();
    execv(argv[i + 1], &argv[i + 1]);
    fprintf(stderr, "execq-launch: cannot execute %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}
