"""Run an untrusted Python program in a sandboxed subprocess.

`run_python(program, stdin, *, config)` runs one program on one stdin and returns what it printed. The code
environment (`credit.envs.code.run_tests`) calls it once per test. The program is model output: it may loop
forever, fork-bomb, eat memory, print gigabytes, write anywhere it can, open sockets or read secrets. The
sandbox stacks these layers (each one documented with what it stops):

==================  ===================================================================================
layer               what it does
==================  ===================================================================================
rlimits             RLIMIT_CPU (ceil(timeout)+1 s), RLIMIT_AS (``memory_mb``), RLIMIT_FSIZE
                    (``max_output_bytes``: caps every file the program writes, its stdout and stderr
                    included, since those are files), RLIMIT_NPROC (``max_procs``), RLIMIT_CORE = 0.
uid                 As root the program runs under a throw-away uid/gid (default: one per run from
                    [50000, 60000), no supplementary groups). Root ignores RLIMIT_NPROC, so without
                    this a fork bomb is not contained; it also makes root-owned files (the repo, the
                    parent's /proc/<pid>/environ, ~/.cache) unreadable and unwritable.
mount namespace     Private tmpfs (``tmpfs_mb`` each) over /tmp, /var/tmp and /dev/shm, so the only
                    world-writable places are private, size-capped and gone when the run ends; the
                    program's cwd is a fresh dir in that tmpfs; /proc is remounted for the new PID ns.
network namespace   A new, empty network namespace (loopback down): no route to anything.
PID namespace       The program is PID 1 of a new namespace: when it exits or is killed, the kernel kills
                    every process it left behind, even ones that called setsid().
audit hook          ``socket.__new__`` raises PermissionError inside the program: the network block
                    also holds where namespaces are unavailable (ctypes can bypass it; the netns cannot
                    be bypassed).
environment         A minimal env (PATH, LANG, HOME/TMPDIR = cwd, thread caps): no parent secrets.
wall clock          A root "bootstrap" process (our code, run before the program) kills the program at
                    ``timeout_s``; the host kills the bootstrap's whole process group as a backstop.
==================  ===================================================================================

Namespaces need root (CAP_SYS_ADMIN) or unprivileged user namespaces; where neither works (e.g. a Docker
container without CAP_SYS_ADMIN) the run still has rlimits, the uid switch (if root), the audit hook and the
scrubbed env, but no private /tmp (files written in the working dir go to the host's disk, each capped at
``max_output_bytes``, all removed afterwards) and only the audit-hook network block. `sandbox_report()` says
which layers are live on this machine. Total memory is bounded by ``max_procs * memory_mb`` plus the tmpfs
sizes (RLIMIT_AS is per process; use a memory cgroup for a hard total).

The sandboxed interpreter must be readable by the throw-away uid. A venv whose base Python lives under a
private home (``/root/.pyenv``, mode 700) is not, so by default the first of ``sys.executable``,
``/usr/bin/python3`` and ``/usr/local/bin/python3`` that passes a probe run is used (``SandboxConfig.python``
overrides). The bootstrap itself runs on ``sys.executable`` as the calling user.

This module imports only the standard library: the host runs it as the bootstrap script
(``python -I -S sandbox.py <config>``), so it must start fast and must not import the package.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

__all__ = ["SandboxConfig", "SandboxError", "SandboxRun", "run_python", "sandbox_report"]

# Throw-away uids for root runs: below 65536 so that containers whose user namespace maps only 0..65535
# (rootless Docker/Podman) accept them, above the usual system/user ranges.
_UID_BASE, _UID_SPAN = 50000, 10000
# Extra seconds the host waits beyond timeout_s before it kills the bootstrap itself (interpreter start,
# namespace setup and the bootstrap's own kill all fit in far less).
_BACKSTOP_S = 5.0

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h), not exposed by the os module on 3.11.
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): setup error, no usable interpreter."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one sandboxed run. All fields have safe defaults.

    Attributes:
        timeout_s: wall-clock limit in seconds, interpreter start included (about 30 ms).
        memory_mb: address-space limit per process (RLIMIT_AS), MiB.
        max_procs: process/thread limit for the run (RLIMIT_NPROC under the run's own uid); 8 leaves room
            for the common ``threading.stack_size`` recursion trick.
        max_output_bytes: cap on stdout, on stderr and on any file the program writes (RLIMIT_FSIZE).
        tmpfs_mb: size of each private tmpfs (/tmp, /var/tmp, /dev/shm) where namespaces are available.
        uid: uid/gid for the program when the caller is root; None = a fresh one per run from
            [50000, 60000); ignored when not root. Never 0.
        python: interpreter for the program; None = the first that works (see module docstring).
        namespaces: try mount/network/PID namespaces (False: rlimits, uid, audit hook only).
    """

    timeout_s: float = 4.0
    memory_mb: int = 1024
    max_procs: int = 8
    max_output_bytes: int = 8 << 20
    tmpfs_mb: int = 64
    uid: int | None = None
    python: str | None = None
    namespaces: bool = True

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 3600):
            raise ValueError(f"SandboxConfig.timeout_s must be a number in (0, 3600] seconds; got {self.timeout_s!r}")
        for name, lo in (("memory_mb", 16), ("max_procs", 1), ("max_output_bytes", 1), ("tmpfs_mb", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"SandboxConfig.{name} must be an int >= {lo}; got {v!r}")
        if self.uid is not None and (not isinstance(self.uid, int) or not 0 < self.uid < 2**32 - 1):
            raise ValueError(f"SandboxConfig.uid must be None or a non-root uid in [1, 2**32-2]; got {self.uid!r}")


@dataclass(frozen=True)
class SandboxRun:
    """What one sandboxed run did.

    Attributes:
        stdout, stderr: decoded output (UTF-8, undecodable bytes replaced), each at most max_output_bytes.
        returncode: the program's exit code, or None if a signal ended it.
        signal: the signal number that ended it (SIGKILL after a timeout), or None.
        timed_out: the wall-clock limit was hit.
        output_limit: stdout or stderr reached max_output_bytes (the program was cut off or failed there).
        wall_s: seconds from the program's start to its end, as the bootstrap measured them.
        layers: the isolation layers that were live for this run (see the module docstring).
    """

    stdout: str
    stderr: str
    returncode: int | None
    signal: int | None
    timed_out: bool
    output_limit: bool
    wall_s: float
    layers: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Exited with status 0 within all limits."""
        return self.returncode == 0 and not self.timed_out and not self.output_limit


# The program runs inside this wrapper (``python -I -B -X utf8 -c _RUNNER``) in its working dir. The audit
# hook cannot be removed once added; tracebacks are cut to the program's own frames so that feedback shows
# ``File "solution.py", line N``, never the wrapper.
_RUNNER = r"""
import sys
def _no_network(event, args):
    if event == "socket.__new__":
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_no_network)
del _no_network
def _run():
    import traceback, types
    with open("solution.py", encoding="utf-8") as f:
        src = f.read()
    sys.argv = ["solution.py"]
    mod = types.ModuleType("__main__")
    mod.__file__ = "solution.py"
    sys.modules["__main__"] = mod
    try:
        exec(compile(src, "solution.py", "exec"), mod.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "solution.py":
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        raise SystemExit(1)
_run()
"""


# ----------------------------------------------------------------------------------------------------------
# host side


def _minimal_env() -> dict[str, str]:
    # Nothing from os.environ: API keys, HF tokens and cloud credentials live there.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One thread per math library: threads count against max_procs and each reserves address space.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


_uid_counter = itertools.count()
_uid_lock = threading.Lock()


def _pick_uid(config: SandboxConfig) -> int | None:
    if os.geteuid() != 0:
        return None
    if config.uid is not None:
        return config.uid
    # A uid of its own per run: RLIMIT_NPROC counts processes per uid, so concurrent runs sharing one uid
    # would starve each other (a fork bomb in one would make the next run's execve fail with EAGAIN).
    with _uid_lock:
        k = next(_uid_counter)
    return _UID_BASE + (os.getpid() * 7919 + k) % _UID_SPAN


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap)
    return data.decode("utf-8", errors="replace"), len(data) >= cap


def _private(path: str, flags: int) -> int:
    # 0600: the program gets its stdin/stdout/stderr as open fds; no other uid may open these files by name
    # (without a private /tmp, a program could otherwise find a concurrent run's files in /tmp).
    return os.open(path, flags, 0o600)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_once(program: str, stdin: str | bytes, config: SandboxConfig, python: str) -> SandboxRun:
    uid = _pick_uid(config)
    root = tempfile.mkdtemp(prefix="credit-sbx-")
    try:
        # root/ is ours (0700, or 0711 so a switched uid can reach work/ when there is no private tmpfs).
        if uid is not None:
            os.chmod(root, 0o711)
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        prog_path = os.path.join(root, "program.py")
        with open(prog_path, "w", encoding="utf-8", opener=_private) as f:
            f.write(program)
        in_path, out_path, err_path = (os.path.join(root, n) for n in ("stdin", "stdout", "stderr"))
        with open(in_path, "wb", opener=_private) as f:
            f.write(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)
        cfg = {
            "program": prog_path,
            "workdir": work,
            "python": python,
            "uid": uid,
            "timeout_s": float(config.timeout_s),
            "cpu_s": math.ceil(config.timeout_s) + 1,
            "memory_bytes": config.memory_mb << 20,
            "max_procs": config.max_procs,
            "fsize": config.max_output_bytes,
            "tmpfs_bytes": config.tmpfs_mb << 20,
            "namespaces": bool(config.namespaces),
            "env": _minimal_env(),
        }
        status_r, status_w = os.pipe()
        try:
            with (
                open(in_path, "rb") as fin,
                open(out_path, "wb", opener=_private) as fout,
                open(err_path, "wb", opener=_private) as ferr,
            ):
                # No preexec_fn: the trainer is multi-threaded (torch), where fork+Python code can deadlock.
                # All setup happens in the bootstrap process instead.
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(cfg), str(status_w)],
                    stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=_minimal_env(),
                    start_new_session=True, close_fds=True, pass_fds=(status_w,),
                )  # fmt: skip
                os.close(status_w)
                status_w = -1
                try:
                    proc.wait(timeout=config.timeout_s + _BACKSTOP_S)
                    backstop = False
                except subprocess.TimeoutExpired:
                    backstop = True
                finally:
                    _kill_group(proc.pid)  # anything left in the bootstrap's group (no-namespace mode)
                    proc.wait()
            status = _read_status(status_r)
        finally:
            os.close(status_r)
            if status_w >= 0:
                os.close(status_w)
        if "setup_error" in status:
            raise SandboxError(f"sandbox setup failed: {status['setup_error']}")
        killed_note = ""
        if backstop:
            status = {"signal": int(signal.SIGKILL), "timed_out": True, "wall_s": config.timeout_s}
        elif "exit" not in status and "signal" not in status:
            # Setup succeeded (setup errors are reported above), so the bootstrap was killed during the run.
            # Only the program can have done that (possible where it shares the caller's uid and no PID
            # namespace hides the bootstrap): a failure of the program, not of the sandbox.
            status = {"signal": int(signal.SIGKILL), "wall_s": 0.0}
            killed_note = "\n[sandbox] the supervising process was killed while the program ran"
        stdout, cut_out = _read_capped(out_path, config.max_output_bytes)
        stderr, cut_err = _read_capped(err_path, config.max_output_bytes)
        return SandboxRun(
            stdout=stdout,
            stderr=stderr + killed_note,
            returncode=status.get("exit"),
            signal=status.get("signal"),
            timed_out=bool(status.get("timed_out")),
            output_limit=cut_out or cut_err,
            wall_s=float(status.get("wall_s", 0.0)),
            layers=tuple(status.get("layers", ())),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _read_status(fd: int) -> dict:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    status: dict = {}
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            status.update(json.loads(line))
        except json.JSONDecodeError:
            pass
    return status


_python_cache: dict[tuple, str] = {}
_python_lock = threading.Lock()


def _python_candidates() -> list[str]:
    out = []
    for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if p and os.path.exists(p) and p not in out:
            out.append(p)
    return out


def _resolve_python(config: SandboxConfig) -> str:
    if config.python is not None:
        return config.python
    key = (os.geteuid(), config.namespaces)
    with _python_lock:
        if key in _python_cache:
            return _python_cache[key]
        probe = replace(config, timeout_s=max(config.timeout_s, 10.0), memory_mb=max(config.memory_mb, 256))
        tried = []
        for cand in _python_candidates():
            try:
                run = _run_once("import heapq, json, math, sys\nprint('ok', sys.version_info[0])", "", probe, cand)
            except SandboxError as exc:  # e.g. execve: Permission denied for a venv under /root
                tried.append(f"{cand}: {exc}")
                continue
            if run.ok and run.stdout.strip() == "ok 3":
                _python_cache[key] = cand
                return cand
            tried.append(f"{cand}: exit {run.returncode}, signal {run.signal}, stderr {run.stderr[-300:]!r}")
        raise SandboxError(
            "no Python interpreter can run inside the sandbox (it must be readable by the sandbox uid); "
            "pass SandboxConfig(python=...) with a world-readable interpreter. Tried:\n  " + "\n  ".join(tried)
        )


def run_python(program: str, stdin: str | bytes = "", *, config: SandboxConfig | None = None) -> SandboxRun:
    """Run a Python program on one stdin inside the sandbox.

    Args:
        program: Python source (str). It runs as ``__main__`` from a file named ``solution.py`` in a private
            empty working dir.
        stdin: text (UTF-8 encoded) or bytes given to the program's standard input.
        config: limits; None = `SandboxConfig()` defaults.

    Returns:
        `SandboxRun` with the captured stdout/stderr, exit status, timeout/output-limit flags and live layers.

    Raises:
        TypeError: program or stdin of the wrong type.
        SandboxError: the sandbox could not be set up (the program's own failures never raise).
    """
    if not isinstance(program, str):
        raise TypeError(f"run_python: program must be a str of Python source; got {type(program).__name__}")
    if not isinstance(stdin, (str, bytes)):
        raise TypeError(f"run_python: stdin must be str or bytes; got {type(stdin).__name__}")
    config = SandboxConfig() if config is None else config
    if not isinstance(config, SandboxConfig):
        raise TypeError(f"run_python: config must be a SandboxConfig; got {type(config).__name__}")
    return _run_once(program, stdin, config, _resolve_python(config))


def sandbox_report(config: SandboxConfig | None = None) -> dict:
    """Probe the sandbox on this machine.

    Returns:
        dict with ``python`` (the interpreter programs run on), ``layers`` (live isolation layers, e.g.
        ``["rlimits", "uid", "mountns", "netns", "pidns", "audit", "env"]``) and ``root`` (bool).
    """
    config = SandboxConfig() if config is None else config
    python = _resolve_python(config)
    run = _run_once("print('ok')", "", config, python)
    return {"python": python, "layers": list(run.layers), "root": os.geteuid() == 0}


# ----------------------------------------------------------------------------------------------------------
# bootstrap side: runs as ``python -I -S -B sandbox.py <config json> <status fd>`` in a new session, as the
# calling user. It sets up namespaces, forks the worker (which becomes PID 1 of the new PID namespace),
# enforces the wall clock and reports one JSON status line on the status fd.


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setup_namespaces(libc, cfg: dict) -> list[str]:
    """unshare mount+net+pid(+ipc) namespaces and mount private tmpfs; return the layers set up."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
    euid, egid = os.geteuid(), os.getegid()
    if euid != 0:
        # Unprivileged: a user namespace owns the others. Map our uid to itself so that the program does
        # not appear to be root; the capabilities we hold in the new namespace are dropped at execve.
        flags |= _CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if euid != 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{euid} {euid} 1"),
                           ("/proc/self/gid_map", f"{egid} {egid} 1")):  # fmt: skip
            with open(path, "w") as f:
                f.write(text)
    # Make every mount private so that nothing we mount propagates back to the host.
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    opts = f"size={cfg['tmpfs_bytes']},mode=1777".encode()
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), f"mount tmpfs {d}")
    return ["mountns", "netns", "pidns"]


def _set_rlimits(cfg: dict) -> None:
    cpu = int(cfg["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize"], cfg["fsize"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_procs"], cfg["max_procs"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _worker(libc, cfg: dict, status_fd: int, in_pidns: bool) -> None:
    """The forked child: mount /proc, drop to the sandbox uid, set limits, exec the program. Never returns."""
    try:
        if in_pidns:
            # A /proc for the new PID namespace: the program sees only its own processes.
            libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
        _set_rlimits(cfg)
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # real, effective and saved: no way back to root
            if os.getuid() == 0 or os.geteuid() == 0:
                raise OSError("setuid did not drop root")
        # Set after setuid (a credential change clears it): dies with the bootstrap if the host kills it.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        env = dict(cfg["env"], HOME=os.getcwd(), TMPDIR=os.getcwd())
        py = cfg["python"]
        os.execve(py, [py, "-I", "-B", "-X", "utf8", "-c", _RUNNER], env)
    except BaseException as exc:  # report and die; never fall through into the bootstrap's code
        try:
            os.write(status_fd, (json.dumps({"setup_error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
        finally:
            os._exit(125)


def _wait(pid: int, timeout_s: float) -> tuple[int, bool]:
    """waitpid with a deadline; kills pid at the deadline. Returns (wait status, timed_out)."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                return os.waitpid(pid, 0)[1], True
            if pidfd >= 0:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid` (kill(-1) as that uid), catching setsid() escapees when there is no PID ns."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # also kills this helper, which is the last one signalled
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _bootstrap(cfg: dict, status_fd: int) -> None:
    os.set_inheritable(status_fd, False)  # the worker's execve closes it: the program cannot forge a status
    libc = _libc()
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()  # read now: the private /tmp mounted below hides the host's copy
    layers = ["rlimits", "audit", "env"]
    if cfg["uid"] is not None:
        layers.append("uid")
    ns_error = None
    if cfg["namespaces"]:
        try:
            layers += _setup_namespaces(libc, cfg)
        except OSError as exc:
            ns_error = str(exc)
    in_ns = "pidns" in layers
    if in_ns:
        work = "/tmp/sandbox"
        os.mkdir(work, 0o700)
        if cfg["uid"] is not None:
            os.chown(work, cfg["uid"], cfg["uid"])
    else:
        work = cfg["workdir"]
    os.chdir(work)
    with open("solution.py", "w", encoding="utf-8") as f:  # root-owned when uid is set: the program can read it
        f.write(source)
    os.chmod("solution.py", 0o444)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _worker(libc, cfg, status_fd, in_ns)
    status, timed_out = _wait(pid, cfg["timeout_s"])
    wall = time.monotonic() - t0
    if cfg["uid"] is not None and not in_ns:
        _kill_uid(cfg["uid"])
    out = {"timed_out": timed_out, "wall_s": round(wall, 4), "layers": layers}
    if ns_error:
        out["ns_error"] = ns_error
    if os.WIFSIGNALED(status):
        out["signal"] = os.WTERMSIG(status)
    else:
        out["exit"] = os.WEXITSTATUS(status)
    os.write(status_fd, (json.dumps(out) + "\n").encode())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("internal bootstrap of credit.envs.sandbox; use run_python() instead")
    try:
        _bootstrap(json.loads(sys.argv[1]), int(sys.argv[2]))
    except BaseException as exc:  # noqa: BLE001 - any bootstrap failure is a sandbox failure, reported as such
        os.write(int(sys.argv[2]), (json.dumps({"setup_error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
        sys.exit(1)
