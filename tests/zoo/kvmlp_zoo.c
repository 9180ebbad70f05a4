// SPDX-License-Identifier: GPL-2.0
/*
 * kvmlp_zoo: the lock scenarios of lib/locking-selftest.c that lockorder claims to
 * judge as lockdep does, run one at a time on request, for the lab's agreement
 * table (tests/test_lab_lockdep.py).
 *
 *   echo abba_spin > /sys/module/kvmlp_zoo/parameters/run
 *
 * Each scenario runs in a fresh kernel thread (an empty held-lock stack) between
 * "kvmlp_zoo: begin NAME" and "kvmlp_zoo: end NAME ok|hung" in the kernel log.
 * Every lock is a static of its own, named SCENARIO__x: lockdep names a static
 * lock's class by its variable, and lockorder (--watch kvmlp_zoo) names it by its
 * symbol, so both name the same class the same way, and its scenario is its prefix.
 * Lockdep reports once and turns itself off (debug_locks: 0 in /proc/lockdep_stats).
 * It is not re-armed here: while it was off, other tasks took and released locks it
 * did not see, and re-armed it reports those (bad unlock balance, recursion in
 * kthreadd) as the next scenario's. So its verdicts take one boot per report: run
 * scenarios in order until it turns off, then boot again from the next one. The
 * scenarios that deadlock for real (hang_*) leave their thread blocked: run them last.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/spinlock.h>
#include <linux/rwlock.h>
#include <linux/mutex.h>
#include <linux/rwsem.h>
#include <linux/srcu.h>
#include <linux/irq_work.h>
#include <linux/interrupt.h>
#include <linux/completion.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvmlockprof's lock zoo: lockdep's scenarios, on request");

/* --- contexts: a hardirq (irq_work) and a softirq (tasklet) running fn ---------- */

static void (*ctx_fn)(void);
static DECLARE_COMPLETION(ctx_done);

static void zoo_irq_work(struct irq_work *w)
{
	ctx_fn();
	complete(&ctx_done);
}
static struct irq_work zoo_irq = IRQ_WORK_INIT_HARD(zoo_irq_work);

static void zoo_tasklet_fn(struct tasklet_struct *t)
{
	ctx_fn();
	complete(&ctx_done);
}
static DECLARE_TASKLET(zoo_tasklet, zoo_tasklet_fn);

static void run_in_hardirq(void (*fn)(void))
{
	ctx_fn = fn;
	reinit_completion(&ctx_done);
	irq_work_queue(&zoo_irq);
	wait_for_completion(&ctx_done);
	irq_work_sync(&zoo_irq);
}

static void run_in_softirq(void (*fn)(void))
{
	ctx_fn = fn;
	reinit_completion(&ctx_done);
	tasklet_schedule(&zoo_tasklet);
	wait_for_completion(&ctx_done);
}

/* --- order: AB-BA and its kin ----------------------------------------------------- */

static DEFINE_SPINLOCK(abba_spin__a);
static DEFINE_SPINLOCK(abba_spin__b);
static void abba_spin(void)
{
	spin_lock(&abba_spin__a);
	spin_lock(&abba_spin__b);
	spin_unlock(&abba_spin__b);
	spin_unlock(&abba_spin__a);
	spin_lock(&abba_spin__b);
	spin_lock(&abba_spin__a);
	spin_unlock(&abba_spin__a);
	spin_unlock(&abba_spin__b);
}

static DEFINE_MUTEX(abba_mutex__a);
static DEFINE_MUTEX(abba_mutex__b);
static void abba_mutex(void)
{
	mutex_lock(&abba_mutex__a);
	mutex_lock(&abba_mutex__b);
	mutex_unlock(&abba_mutex__b);
	mutex_unlock(&abba_mutex__a);
	mutex_lock(&abba_mutex__b);
	mutex_lock(&abba_mutex__a);
	mutex_unlock(&abba_mutex__a);
	mutex_unlock(&abba_mutex__b);
}

static DEFINE_SPINLOCK(abbcca__a);
static DEFINE_SPINLOCK(abbcca__b);
static DEFINE_SPINLOCK(abbcca__c);
static void abbcca(void)
{
	spin_lock(&abbcca__a);
	spin_lock(&abbcca__b);
	spin_unlock(&abbcca__b);
	spin_unlock(&abbcca__a);
	spin_lock(&abbcca__b);
	spin_lock(&abbcca__c);
	spin_unlock(&abbcca__c);
	spin_unlock(&abbcca__b);
	spin_lock(&abbcca__c);
	spin_lock(&abbcca__a);
	spin_unlock(&abbcca__a);
	spin_unlock(&abbcca__c);
}

/* a reader of an rwsem waits behind a queued writer: its order counts */
static DECLARE_RWSEM(abba_rwsem_read_mutex__sem);
static DEFINE_MUTEX(abba_rwsem_read_mutex__mutex);
static void abba_rwsem_read_mutex(void)
{
	down_read(&abba_rwsem_read_mutex__sem);
	mutex_lock(&abba_rwsem_read_mutex__mutex);
	mutex_unlock(&abba_rwsem_read_mutex__mutex);
	up_read(&abba_rwsem_read_mutex__sem);
	mutex_lock(&abba_rwsem_read_mutex__mutex);
	down_read(&abba_rwsem_read_mutex__sem);
	up_read(&abba_rwsem_read_mutex__sem);
	mutex_unlock(&abba_rwsem_read_mutex__mutex);
}

/* both ways under a read of one rwlock in task context (not a recursive reader) */
static DEFINE_RWLOCK(abba_rlock_spin__rw);
static DEFINE_SPINLOCK(abba_rlock_spin__spin);
static void abba_rlock_spin_fn(void)
{
	read_lock(&abba_rlock_spin__rw);
	spin_lock(&abba_rlock_spin__spin);
	spin_unlock(&abba_rlock_spin__spin);
	read_unlock(&abba_rlock_spin__rw);
	spin_lock(&abba_rlock_spin__spin);
	read_lock(&abba_rlock_spin__rw);
	read_unlock(&abba_rlock_spin__rw);
	spin_unlock(&abba_rlock_spin__spin);
}

/* the same order each time: nothing to report */
static DEFINE_SPINLOCK(ab_ab__a);
static DEFINE_MUTEX(ab_ab__m);
static void ab_ab(void)
{
	int i;

	for (i = 0; i < 2; i++) {
		mutex_lock(&ab_ab__m);
		spin_lock(&ab_ab__a);
		spin_unlock(&ab_ab__a);
		mutex_unlock(&ab_ab__m);
	}
}

/* a trylock makes no dependency: B-then-tryA after A-then-B is no inversion */
static DEFINE_SPINLOCK(trylock_ba__a);
static DEFINE_SPINLOCK(trylock_ba__b);
static void trylock_ba(void)
{
	spin_lock(&trylock_ba__a);
	spin_lock(&trylock_ba__b);
	spin_unlock(&trylock_ba__b);
	spin_unlock(&trylock_ba__a);
	spin_lock(&trylock_ba__b);
	if (spin_trylock(&trylock_ba__a))
		spin_unlock(&trylock_ba__a);
	spin_unlock(&trylock_ba__b);
}

/* ten nested, then the deepest two reversed: lockdep holds 48 */
static DEFINE_SPINLOCK(deep_nesting__0);
static DEFINE_SPINLOCK(deep_nesting__1);
static DEFINE_SPINLOCK(deep_nesting__2);
static DEFINE_SPINLOCK(deep_nesting__3);
static DEFINE_SPINLOCK(deep_nesting__4);
static DEFINE_SPINLOCK(deep_nesting__5);
static DEFINE_SPINLOCK(deep_nesting__6);
static DEFINE_SPINLOCK(deep_nesting__7);
static DEFINE_SPINLOCK(deep_nesting__8);
static DEFINE_SPINLOCK(deep_nesting__9);
static spinlock_t *const deep[] = {
	&deep_nesting__0, &deep_nesting__1, &deep_nesting__2, &deep_nesting__3, &deep_nesting__4,
	&deep_nesting__5, &deep_nesting__6, &deep_nesting__7, &deep_nesting__8, &deep_nesting__9,
};
static void deep_nesting(void)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(deep); i++)
		spin_lock(deep[i]);
	for (i = ARRAY_SIZE(deep) - 1; i >= 0; i--)
		spin_unlock(deep[i]);
	spin_lock(&deep_nesting__9);
	spin_lock(&deep_nesting__8);
	spin_unlock(&deep_nesting__8);
	spin_unlock(&deep_nesting__9);
}

/* --- recursion that does not deadlock --------------------------------------------- */

/* read_lock twice in task context: a queued rwlock's second reader waits behind a
 * queued writer (lockdep: not a recursive reader there) */
static DEFINE_RWLOCK(rlock_twice__rw);
static void rlock_twice(void)
{
	read_lock(&rlock_twice__rw);
	read_lock(&rlock_twice__rw);
	read_unlock(&rlock_twice__rw);
	read_unlock(&rlock_twice__rw);
}

/* in softirq it is a recursive reader: fine */
static DEFINE_RWLOCK(rlock_twice_softirq__rw);
static void rlock_twice_irq_body(void)
{
	read_lock(&rlock_twice_softirq__rw);
	read_lock(&rlock_twice_softirq__rw);
	read_unlock(&rlock_twice_softirq__rw);
	read_unlock(&rlock_twice_softirq__rw);
}
static void rlock_twice_softirq(void)
{
	run_in_softirq(rlock_twice_irq_body);
}

/* an rwsem's readers are never recursive */
static DECLARE_RWSEM(rwsem_read_twice__sem);
static void rwsem_read_twice(void)
{
	down_read(&rwsem_read_twice__sem);
	down_read(&rwsem_read_twice__sem);
	up_read(&rwsem_read_twice__sem);
	up_read(&rwsem_read_twice__sem);
}

/* SRCU read sections nest */
DEFINE_STATIC_SRCU(srcu_read_twice__srcu);
static void srcu_read_twice(void)
{
	int i = srcu_read_lock(&srcu_read_twice__srcu);
	int j = srcu_read_lock(&srcu_read_twice__srcu);

	srcu_read_unlock(&srcu_read_twice__srcu, j);
	srcu_read_unlock(&srcu_read_twice__srcu, i);
}

/* --- IRQ safety ------------------------------------------------------------------- */

static DEFINE_SPINLOCK(hardirq_inconsistent__a);
static void hardirq_incons_irq(void)
{
	spin_lock(&hardirq_inconsistent__a);
	spin_unlock(&hardirq_inconsistent__a);
}
static void hardirq_inconsistent(void)
{
	run_in_hardirq(hardirq_incons_irq);
	spin_lock(&hardirq_inconsistent__a);           /* IRQs on: the IRQ may come here */
	spin_unlock(&hardirq_inconsistent__a);
}

static DEFINE_SPINLOCK(hardirq_irqsave__a);
static void hardirq_save_irq(void)
{
	spin_lock(&hardirq_irqsave__a);
	spin_unlock(&hardirq_irqsave__a);
}
static void hardirq_irqsave(void)
{
	unsigned long flags;

	run_in_hardirq(hardirq_save_irq);
	spin_lock_irqsave(&hardirq_irqsave__a, flags);
	spin_unlock_irqrestore(&hardirq_irqsave__a, flags);
	spin_lock_irq(&hardirq_irqsave__a);
	spin_unlock_irq(&hardirq_irqsave__a);
}

static DEFINE_SPINLOCK(softirq_inconsistent__a);
static void softirq_incons_bh(void)
{
	spin_lock(&softirq_inconsistent__a);
	spin_unlock(&softirq_inconsistent__a);
}
static void softirq_inconsistent(void)
{
	run_in_softirq(softirq_incons_bh);
	spin_lock(&softirq_inconsistent__a);           /* BH on: the softirq may come here */
	spin_unlock(&softirq_inconsistent__a);
}

static DEFINE_SPINLOCK(softirq_bh__a);
static void softirq_bh_bh(void)
{
	spin_lock(&softirq_bh__a);
	spin_unlock(&softirq_bh__a);
}
static void softirq_bh(void)
{
	run_in_softirq(softirq_bh_bh);
	spin_lock_bh(&softirq_bh__a);
	spin_unlock_bh(&softirq_bh__a);
}

/* A is taken in hardirq (IRQ-safe), B with IRQs on (IRQ-unsafe): A -> B lets the
 * IRQ that wants A spin on a CPU whose task waits for B's holder */
static DEFINE_SPINLOCK(hardirq_safe_unsafe__safe);
static DEFINE_SPINLOCK(hardirq_safe_unsafe__unsafe);
static void hardirq_order_irq(void)
{
	spin_lock(&hardirq_safe_unsafe__safe);
	spin_unlock(&hardirq_safe_unsafe__safe);
}
static void hardirq_safe_unsafe(void)
{
	unsigned long flags;

	run_in_hardirq(hardirq_order_irq);
	spin_lock(&hardirq_safe_unsafe__unsafe);
	spin_unlock(&hardirq_safe_unsafe__unsafe);
	spin_lock_irqsave(&hardirq_safe_unsafe__safe, flags);
	spin_lock(&hardirq_safe_unsafe__unsafe);
	spin_unlock(&hardirq_safe_unsafe__unsafe);
	spin_unlock_irqrestore(&hardirq_safe_unsafe__safe, flags);
}

static DEFINE_SPINLOCK(softirq_safe_unsafe__safe);
static DEFINE_SPINLOCK(softirq_safe_unsafe__unsafe);
static void softirq_order_bh(void)
{
	spin_lock(&softirq_safe_unsafe__safe);
	spin_unlock(&softirq_safe_unsafe__safe);
}
static void softirq_safe_unsafe(void)
{
	run_in_softirq(softirq_order_bh);
	spin_lock(&softirq_safe_unsafe__unsafe);
	spin_unlock(&softirq_safe_unsafe__unsafe);
	spin_lock_bh(&softirq_safe_unsafe__safe);
	spin_lock(&softirq_safe_unsafe__unsafe);
	spin_unlock(&softirq_safe_unsafe__unsafe);
	spin_unlock_bh(&softirq_safe_unsafe__safe);
}

/* an SRCU read section in softirq and in a task with BH on: readers never exclude
 * each other */
DEFINE_STATIC_SRCU(srcu_read_in_softirq__srcu);
static void srcu_irq_bh(void)
{
	int i = srcu_read_lock(&srcu_read_in_softirq__srcu);

	srcu_read_unlock(&srcu_read_in_softirq__srcu, i);
}
static void srcu_read_in_softirq(void)
{
	int i;

	run_in_softirq(srcu_irq_bh);
	i = srcu_read_lock(&srcu_read_in_softirq__srcu);
	srcu_read_unlock(&srcu_read_in_softirq__srcu, i);
}

/* --- SRCU and a grace period -------------------------------------------------------- */

/* a reader takes M, and M's holder waits for the readers */
DEFINE_STATIC_SRCU(srcu_abba__srcu);
static DEFINE_MUTEX(srcu_abba__mutex);
static void srcu_abba(void)
{
	int i = srcu_read_lock(&srcu_abba__srcu);

	mutex_lock(&srcu_abba__mutex);
	mutex_unlock(&srcu_abba__mutex);
	srcu_read_unlock(&srcu_abba__srcu, i);
	mutex_lock(&srcu_abba__mutex);
	synchronize_srcu(&srcu_abba__srcu);
	mutex_unlock(&srcu_abba__mutex);
}

/* --- a failed killable acquisition holds nothing ---------------------------------- */

static DEFINE_MUTEX(killable_fail__m);
static DEFINE_MUTEX(killable_fail__n);
static DECLARE_COMPLETION(killable_held);
static DECLARE_COMPLETION(killable_release);

static int killable_holder(void *unused)
{
	mutex_lock(&killable_fail__m);
	complete(&killable_held);
	wait_for_completion(&killable_release);
	mutex_unlock(&killable_fail__m);
	return 0;
}

static void killable_fail(void)
{
	struct task_struct *t;

	reinit_completion(&killable_held);
	reinit_completion(&killable_release);
	t = kthread_run(killable_holder, NULL, "kvmlp_zoo_hold");
	if (IS_ERR(t))
		return;
	wait_for_completion(&killable_held);
	allow_signal(SIGKILL);
	send_sig(SIGKILL, current, 1);
	if (!mutex_lock_killable(&killable_fail__m))          /* fails: a fatal signal waits */
		mutex_unlock(&killable_fail__m);
	flush_signals(current);
	mutex_lock(&killable_fail__n);
	mutex_unlock(&killable_fail__n);
	complete(&killable_release);
	msleep(20);
	/* N -> M only: no inversion, unless the failed M was taken as held */
	mutex_lock(&killable_fail__n);
	mutex_lock(&killable_fail__m);
	mutex_unlock(&killable_fail__m);
	mutex_unlock(&killable_fail__n);
}

/* --- a lock never released: seed 003's rwsem, held from a notifier's range start to
 * an end that never ran (the VM outlived the notifier) -------------------------------- */

static DECLARE_RWSEM(held_at_exit__sem);
static void held_at_exit(void)
{
	down_read(&held_at_exit__sem);          /* its thread exits holding it */
}

static DECLARE_RWSEM(held_to_user__sem);
static void held_to_user(void)
{
	down_read(&held_to_user__sem);          /* run by the writer: back to user space */
}

/* --- real deadlocks: the thread stays blocked (run these last) -------------------- */

static DEFINE_MUTEX(hang_aa_mutex__m);
static void hang_aa_mutex_fn(void)
{
	mutex_lock(&hang_aa_mutex__m);
	mutex_lock(&hang_aa_mutex__m);
}

static DECLARE_RWSEM(hang_rwsem_write_read__sem);
static void hang_rwsem_write_read(void)
{
	down_write(&hang_rwsem_write_read__sem);
	down_read(&hang_rwsem_write_read__sem);
}

DEFINE_STATIC_SRCU(hang_srcu_sync_in_read__srcu);
static void hang_srcu_sync_in_read(void)
{
	srcu_read_lock(&hang_srcu_sync_in_read__srcu);
	synchronize_srcu(&hang_srcu_sync_in_read__srcu);
}

/* --- the runner ------------------------------------------------------------------- */

struct scenario {
	const char *name;
	void (*fn)(void);
	bool in_caller;         /* run by the task that wrote its name, not a kthread */
};

static const struct scenario scenarios[] = {
	{ "ab_ab", ab_ab },
	{ "abba_spin", abba_spin },
	{ "abba_mutex", abba_mutex },
	{ "abbcca", abbcca },
	{ "abba_rwsem_read_mutex", abba_rwsem_read_mutex },
	{ "abba_rlock_spin", abba_rlock_spin_fn },
	{ "trylock_ba", trylock_ba },
	{ "deep_nesting", deep_nesting },
	{ "rlock_twice", rlock_twice },
	{ "rlock_twice_softirq", rlock_twice_softirq },
	{ "rwsem_read_twice", rwsem_read_twice },
	{ "srcu_read_twice", srcu_read_twice },
	{ "hardirq_inconsistent", hardirq_inconsistent },
	{ "hardirq_irqsave", hardirq_irqsave },
	{ "softirq_inconsistent", softirq_inconsistent },
	{ "softirq_bh", softirq_bh },
	{ "hardirq_safe_unsafe", hardirq_safe_unsafe },
	{ "softirq_safe_unsafe", softirq_safe_unsafe },
	{ "srcu_read_in_softirq", srcu_read_in_softirq },
	{ "srcu_abba", srcu_abba },
	{ "killable_fail", killable_fail },
	{ "held_at_exit", held_at_exit },
	{ "held_to_user", held_to_user, true },
	{ "hang_aa_mutex", hang_aa_mutex_fn },
	{ "hang_rwsem_write_read", hang_rwsem_write_read },
	{ "hang_srcu_sync_in_read", hang_srcu_sync_in_read },
};

static DEFINE_MUTEX(run_lock);          /* one scenario at a time (never watched) */
static DECLARE_COMPLETION(run_done);

static int run_thread(void *data)
{
	const struct scenario *s = data;

	s->fn();
	complete(&run_done);
	return 0;
}

/* The previous scenario's thread is gone (its exit checks its held locks). */
static void wait_exited(struct task_struct *t)
{
	int i;

	for (i = 0; i < 200 && !READ_ONCE(t->exit_state); i++)
		msleep(10);
}

static int run_scenario(const struct scenario *s)
{
	struct task_struct *t;
	int hung;

	pr_info("kvmlp_zoo: begin %s\n", s->name);
	if (s->in_caller) {
		s->fn();
		pr_info("kvmlp_zoo: end %s ok\n", s->name);
		return 0;
	}
	reinit_completion(&run_done);
	t = kthread_create(run_thread, (void *)s, "kvmlp_zoo");
	if (IS_ERR(t))
		return PTR_ERR(t);
	get_task_struct(t);
	wake_up_process(t);
	hung = !wait_for_completion_timeout(&run_done, 2 * HZ);
	if (!hung)
		wait_exited(t);
	put_task_struct(t);
	pr_info("kvmlp_zoo: end %s %s\n", s->name, hung ? "hung" : "ok");
	return 0;
}

static int run_set(const char *val, const struct kernel_param *kp)
{
	char name[64];
	int i, ret = -EINVAL;

	strscpy(name, val, sizeof(name));
	strim(name);
	mutex_lock(&run_lock);
	for (i = 0; i < ARRAY_SIZE(scenarios); i++)
		if (!strcmp(name, scenarios[i].name))
			ret = run_scenario(&scenarios[i]);
	mutex_unlock(&run_lock);
	return ret;
}

static int run_get(char *buf, const struct kernel_param *kp)
{
	int i, n = 0;

	for (i = 0; i < ARRAY_SIZE(scenarios); i++)
		n += sysfs_emit_at(buf, n, "%s\n", scenarios[i].name);
	return n;
}

static const struct kernel_param_ops run_ops = { .set = run_set, .get = run_get };
module_param_cb(run, &run_ops, NULL, 0600);
MODULE_PARM_DESC(run, "write a scenario's name to run it; read: the scenarios");

static int __init zoo_init(void)
{
	return 0;
}

static void __exit zoo_exit(void)
{
	tasklet_kill(&zoo_tasklet);
	irq_work_sync(&zoo_irq);
}

module_init(zoo_init);
module_exit(zoo_exit);
