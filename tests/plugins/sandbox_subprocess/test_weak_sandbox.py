"""The python sandbox refuses to start without a protection it needs, unless the operator opts out.

The machine is made weaker for real: the kernel runs under a seccomp filter that answers ENOSYS to
Landlock, as some container runtimes' default profiles do.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from tenantflow.client import Client
from tenantflow.plugins.sandbox_subprocess import syscalls
from tests.conftest import TEST_LIMITS
from tests.security.bystander import bystander_completes

NO_LANDLOCK = """
import errno, runpy, sys
import pyseccomp
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "landlock_create_ruleset")
rules.load()
sys.argv = ["tenantflow", *sys.argv[1:]]
runpy.run_module("tenantflow.kernel.cli", run_name="__main__")
"""


def serve_without_landlock(data_dir: Path, *flags: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", NO_LANDLOCK, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
           *TEST_LIMITS, *flags]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_kernel_refuses_a_sandbox_without_landlock(tmp_path: Path) -> None:
    proc = serve_without_landlock(tmp_path / "kernel")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output
    assert "listening on" not in output
    assert "Landlock file isolation" in output and "--unsafe-allow-weak-sandbox" in output, output


def test_the_operator_can_opt_out_loudly(tmp_path: Path, tenant: str) -> None:
    proc = serve_without_landlock(tmp_path / "kernel", "--unsafe-allow-weak-sandbox")
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "listening on" in line:
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "\n".join(lines)
        address = next(line for line in lines if "listening on" in line).split("listening on ")[1].split()[0]
        warnings = [line for line in lines if "WARNING" in line and "UNSAFE" in line]
        assert any("Landlock file isolation" in line for line in warnings), lines
        with Client(address) as client:
            bystander_completes(client, tenant, within=30.0)  # tenant code still runs, just weaker
    finally:
        proc.terminate()
        proc.wait(15)
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()


DANGEROUS = (
    "sethostname", "setdomainname", "adjtimex", "clock_adjtime", "clock_settime", "settimeofday",
    "syslog", "sched_setscheduler", "sched_setparam", "sched_setattr", "sched_setaffinity",
    "setpriority", "ioprio_set", "fanotify_init", "fanotify_mark", "inotify_init1", "mount",
    "umount2", "pivot_root", "chroot", "ptrace", "process_vm_readv", "process_vm_writev", "bpf",
    "perf_event_open", "keyctl", "add_key", "request_key", "unshare", "setns", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "userfaultfd", "personality", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "acct",
    "execve", "execveat", "setuid", "setgid", "setresuid", "setgroups", "capset", "chmod",
    "fchmod", "fchmodat", "chown", "fchown", "utimensat", "mknod", "shmget", "msgget", "semget",
    "mq_open", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "kcmp", "tkill", "rt_sigqueueinfo",
    "name_to_handle_at", "open_by_handle_at", "quotactl", "vhangup", "iopl", "ioperm", "modify_ldt",
)  # fmt: skip


def test_dangerous_calls_are_outside_the_allow_list() -> None:
    allowed = set(syscalls.ALLOWED) | set(syscalls.TEMPLATE_ONLY)
    assert allowed.isdisjoint(DANGEROUS), sorted(allowed & set(DANGEROUS))
    # ioctl, prctl, socket, clone, kill and prlimit64 are allowed only with the arguments listed
    assert allowed.isdisjoint({"ioctl", "prctl", "socket", "clone", "clone3", "kill", "tgkill", "prlimit64"})
