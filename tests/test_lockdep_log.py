"""tests/lockdep.py against lockdep's own words: the log of the lockdep lab kernel
over the lock zoo (tests/data/lockdep-zoo-6.12.txt, make lab-lockdep-test, the zoo's
lines only). Each report's header line and lock lines, read by eye, are the
expectations below; the parser must give the same kind and classes."""
import pathlib

from lockdep import by_scenario, reports, scenario_runs

LOG = (pathlib.Path(__file__).parent / "data" / "lockdep-zoo-6.12.txt").read_text()


def test_each_report_is_read_with_its_scenario_kind_and_classes():
    got = {s: (k, sorted(c.split("__")[1] for c in cl)) for s, (k, cl) in
           by_scenario(LOG).items()}
    assert got == {
        "ab_ab": ("silent", []), "trylock_ba": ("silent", []),
        "rlock_twice_softirq": ("silent", []), "srcu_read_twice": ("silent", []),
        "hardirq_irqsave": ("silent", []), "softirq_bh": ("silent", []),
        "srcu_read_in_softirq": ("silent", []), "killable_fail": ("silent", []),
        # "WARNING: possible circular locking dependency detected"
        "abba_spin": ("inversion", ["a", "b"]), "abba_mutex": ("inversion", ["a", "b"]),
        "abbcca": ("inversion", ["a", "b", "c"]),
        "abba_rwsem_read_mutex": ("inversion", ["mutex", "sem"]),
        "abba_rlock_spin": ("inversion", ["rw", "spin"]),
        "deep_nesting": ("inversion", ["8", "9"]),
        "srcu_abba": ("inversion", ["mutex", "srcu"]),
        # "WARNING: possible recursive locking detected"
        "rlock_twice": ("recursion", ["rw"]), "rwsem_read_twice": ("recursion", ["sem"]),
        "hang_aa_mutex": ("recursion", ["m"]), "hang_rwsem_write_read": ("recursion", ["sem"]),
        "hang_srcu_sync_in_read": ("recursion", ["srcu"]),
        # "WARNING: inconsistent lock state" / "X-safe -> X-unsafe lock order detected"
        "hardirq_inconsistent": ("IRQ-safety", ["a"]),
        "softirq_inconsistent": ("IRQ-safety", ["a"]),
        "hardirq_safe_unsafe": ("IRQ-safety", ["safe", "unsafe"]),
        "softirq_safe_unsafe": ("IRQ-safety", ["safe", "unsafe"]),
    }


def test_every_report_and_run_is_counted():
    assert len(reports(LOG)) == LOG.count("WARNING: ") == 16
    runs = scenario_runs(LOG)
    assert len(runs) == 24 and [s for s, v in runs.items() if v == "hung"] == \
        ["hang_aa_mutex", "hang_rwsem_write_read", "hang_srcu_sync_in_read"]


def test_a_report_outside_the_zoo_has_no_scenario_and_others_have_no_kind():
    log = ("[ 1.0] WARNING: bad unlock balance detected!\n"
           "[ 1.1] kthreadd/2 is trying to release lock (x) at:\n"
           "[ 2.0] kvmlp_zoo: begin abba_spin\n"
           "[ 2.1] WARNING: possible recursive locking detected\n"
           "[ 2.2]  ffff (lock){+.+.}-{2:2}, at: __radix_tree_preload+0x41/0x260\n"
           "[ 2.3] stack backtrace:\n[ 2.4]  (abba_spin__a){+.+.}\n"
           "[ 2.5] kvmlp_zoo: end abba_spin ok\n")
    r = reports(log)
    assert [(x["scenario"], x["kind"]) for x in r] == [(None, None), ("abba_spin", "recursion")]
    assert r[1]["classes"] == {"lock"}
    # a scenario whose report names none of its locks: the kind, and no classes
    assert by_scenario(log) == {"abba_spin": ("recursion", frozenset())}


# The lockdep lab's log of held_at_exit on 2026-12-05 (two CPUs under the emulator): the
# zoo's end line, printed on the other CPU, landed between the report's "#0:" and its lock
INTERLEAVED = """\
[   78.418107] kvmlp_zoo: begin held_at_exit
[   78.421150] ====================================
[   78.421228] WARNING: kvmlp_zoo/340 still has locks held!
[   78.421911] 6.12.118-kvmlp-lockdep #2 Tainted: G           O
[   78.422085] ------------------------------------
[   78.422175] 1 lock held by kvmlp_zoo/340:
[   78.422278]  #0:
[   78.422878] kvmlp_zoo: end held_at_exit ok
[   78.422356] ffffffffc0528910 (held_at_exit__sem){.+.+}-{3:3}, at: run_thread+0x12/0x30
[   78.426393]
               stack backtrace:
"""


def test_a_report_keeps_its_lines_across_an_end_line_printed_inside_it():
    assert by_scenario(INTERLEAVED) == {"held_at_exit": ("held at exit",
                                                         frozenset({"held_at_exit__sem"}))}


# a lab run's log (lockdep kernel, 2026-12-05): the zoo's thread exits after the end line
AFTER_ITS_END = """\
[   62.442243] kvmlp_zoo: begin killable_fail
[   62.469623] kvmlp_zoo: end killable_fail ok
[   62.584702] kvmlp_zoo: begin held_at_exit
[   62.587575] kvmlp_zoo: end held_at_exit ok
[   62.588600] ====================================
[   62.588678] WARNING: kvmlp_zoo/292 still has locks held!
[   62.588986] 6.12.118-kvmlp-lockdep #2 Tainted: G           O
[   62.589136] ------------------------------------
[   62.589219] 1 lock held by kvmlp_zoo/292:
[   62.590431]  #0: ffffffffc03e1910 (held_at_exit__sem){.+.+}-{3:3}, at: run_thread+0x12
[   62.593526]
               stack backtrace:
[   62.596489]  debug_check_no_locks_held+0xc7/0xd0
[   62.596520]  do_exit+0x7b9/0xc00
"""


def test_a_thread_exiting_after_its_end_line_is_still_its_scenarios():
    assert by_scenario(AFTER_ITS_END) == {
        "killable_fail": ("silent", frozenset()),
        "held_at_exit": ("held at exit", frozenset({"held_at_exit__sem"}))}
