"""Lockdep's verdicts, read from a kernel log: the authority lockorder is held
against (tests/test_lab_lockdep.py). Each report is one of lockdep's own headers,
mapped to the kind of finding lockorder gives, with the lock classes it names; the
lock zoo's "kvmlp_zoo: begin/end NAME" lines say which scenario it came from."""
import re

# lockdep's report headers (kernel/locking/lockdep.c) -> lockorder's kind
KINDS = {
    "possible recursive locking detected": "recursion",
    "possible circular locking dependency detected": "inversion",
    "inconsistent lock state": "IRQ-safety",
    "possible irq lock inversion dependency detected": "IRQ-safety",
    "HARDIRQ-safe -> HARDIRQ-unsafe lock order detected": "IRQ-safety",
    "SOFTIRQ-safe -> SOFTIRQ-unsafe lock order detected": "IRQ-safety",
    "lock held when returning to user space": "held at return to user space",
    "still has locks held": "held at exit",       # "WARNING: comm/pid still has ..."
}
_HELD_LIST = re.compile(r"^(?:\d+|no) locks? held by ")
_TASK = re.compile(r"^\S+/\d+ (still has locks held)$")
# checked after the scenario's end line: as the write that ran it returns, as the
# thread it started exits (kthread_exit's debug_check_no_locks_held)
AFTER_END = {"lock held when returning to user space", "still has locks held"}
_PREFIX = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_WARNING = re.compile(r"^(?:WARNING|BUG): (.+?)!?\s*$")
_MARK = re.compile(r"kvmlp_zoo: (begin|end) (\S+)(?: (\S+))?")
# "(class){usage}" or "(class){usage}-{wait:wait}", the class may be "&x->y" or "x#2"
_CLASS = re.compile(r"\(([^()\s{}]+)\)\{")


def reports(log):
    """[{scenario, header, kind, classes}] from a kernel log (dmesg's text); kind is
    None for a report lockdep makes that is no lock-order verdict (bad unlock
    balance, a held lock freed, sleeping in atomic...)."""
    out, scenario, ended, cur = [], None, None, None
    for raw in log.splitlines():
        line = _PREFIX.sub("", raw)
        m = _MARK.search(line)
        if m:
            scenario = m.group(2) if m.group(1) == "begin" else None
            ended = m.group(2) if m.group(1) == "end" else None
            if m.group(1) == "begin":
                cur = None
            # (an end line may come inside a report: printk from another CPU lands
            # between a report's lines, its held lock's line after it)
            continue
        w = _WARNING.match(line.strip())
        header = w and (_TASK.sub(r"\1", w.group(1)))
        if header and (header in KINDS or "lock" in header):
            cur = {"scenario": scenario or (ended if header in AFTER_END else None),
                   "header": header, "kind": KINDS.get(header), "classes": set()}
            out.append(cur)
            continue
        if cur is not None:
            # the held locks' list names the report's own locks only when it is about
            # them (held on leaving); else they are bystanders (vcpu->mutex, kvm->srcu)
            if line.startswith("stack backtrace:") or \
                    (_HELD_LIST.match(line.strip()) and cur["classes"]):
                cur = None
            else:
                cur["classes"].update(_CLASS.findall(line))
    return out


def scenario_runs(log):
    """{scenario: "ok" | "hung"} from the zoo's end lines."""
    return {m.group(2): m.group(3) for m in
            (_MARK.search(_PREFIX.sub("", line)) for line in log.splitlines())
            if m and m.group(1) == "end"}


def by_scenario(log):
    """{scenario: (kind or "silent", the scenario's own classes named)}: the first
    report inside each scenario (lockdep reports once, then is re-armed)."""
    out = {s: ("silent", frozenset()) for s in scenario_runs(log)}
    for r in reports(log):
        s = r["scenario"]
        if s and out.get(s, ("silent",))[0] == "silent":
            own = frozenset(c for c in r["classes"] if c.split("__")[0] == s)
            out[s] = (r["kind"] or r["header"], own)
    return out
