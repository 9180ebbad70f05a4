"""Symbol resolution on a kallsyms file written here, and the running kernel's."""
from kvmlockprof.kernel import ksyms
from kvmlockprof.kernel.ksyms import Kallsyms

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000100 T kvm_vm_ioctl
ffffffff81000200 t queued_spin_lock_slowpath
ffffffff81000300 T __sched_text_start
ffffffff81000310 T __mutex_lock
ffffffff81000400 T __sched_text_end
ffffffff81000400 T __lock_text_start
ffffffff81000410 T _raw_spin_lock
ffffffff81000500 T __lock_text_end
ffffffff82000000 D __start_init_stack
ffffffff82010000 D jiffies_lock
ffffffffc0000000 t vmx_vcpu_run\t[kvm_intel]
"""


def test_frames_locks_and_data(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text(KALLSYMS)
    k = Kallsyms(str(f))
    assert k.frames([0xffffffff81000123, 0xffffffffc0000010]) == [
        "kvm_vm_ioctl+0x23", "vmx_vcpu_run+0x10 [kvm_intel]"]
    assert k.is_lock_function([0xffffffff81000205, 0xffffffff81000315, 0xffffffff81000411,
                               0xffffffff81000101]).tolist() == [True, True, True, False]
    # a lock in .data is named only by a data symbol that holds it, never by a marker
    assert k.data_symbols([0xffffffff82010004, 0xffffffff82000040, 0xffff888100000000]) == [
        "jiffies_lock+0x4", None, None]


def test_text_symbols_are_awks(tmp_path):
    """The running kernel's text symbols, first of each name: as awk reads the same
    snapshot of /proc/kallsyms (type t/T/w/W, the module in brackets)."""
    import shutil
    import subprocess
    snap = tmp_path / "kallsyms"
    shutil.copyfile("/proc/kallsyms", snap)
    awk = subprocess.run(
        ["awk", '$2 ~ /^[tTwW]$/ && !($3 in seen) {seen[$3] = 1; m = $4; '
         'gsub(/[][]/, "", m); print $3 "\\t" m}', str(snap)],
        capture_output=True, text=True, check=True).stdout
    theirs = dict(line.split("\t") for line in awk.splitlines())
    assert len(theirs) > 1000
    assert ksyms.text_symbols(snap) == theirs



def test_kallsyms_table_is_awks(tmp_path):
    """Every symbol with an address, in address order (ties as the file has them): as
    awk and a stable sort read the same snapshot."""
    import shutil
    import subprocess
    snap = tmp_path / "kallsyms"
    shutil.copyfile("/proc/kallsyms", snap)
    theirs = subprocess.run(
        ["env", "LC_ALL=C", "sh", "-c", 'awk \'$1 !~ /^0+$/ {m = $4; gsub(/[][]/, "", m); '
         'print $1 " " $2 " " $3 " " m}\' "$0" | sort -s -k1,1', str(snap)],
        capture_output=True, text=True, check=True).stdout.splitlines()
    k = Kallsyms(str(snap))
    ours = [f"{a:016x} {t} {n} {m}" for a, t, n, m in
            zip(k.addr.tolist(), k.type, k.name, k.module)]
    assert len(theirs) > 1000
    assert ours == theirs
