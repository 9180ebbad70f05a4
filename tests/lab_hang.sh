# In the lab (kvmlockprof lab --kernel /boot/vmlinuz-6.1.* --console console.log -- sh
# tests/lab_hang.sh TAG N [record options]): N runs of the gpc/srcu lab test's workload,
# under `record` with the options given, else alone. A run still going after 240 s is
# a hang: its workload's threads' kernel stacks go to TAG-hangI.txt, sysrq l/w to the
# console; result.txt says which runs finished and how long they took.
tag=$1; n=$2; shift 2
for i in $(seq "$n"); do
  if [ $# -gt 0 ]; then
    kvmlockprof record -q -f -o "$tag$i.parquet" "$@" -- \
      kvmlockprof workload --vcpus 2 --duration 6 --kvmclock --churn > "$tag$i.log" 2>&1 &
  else
    kvmlockprof workload --vcpus 2 --duration 6 --kvmclock --churn > "$tag$i.log" 2>&1 &
  fi
  t=0
  while kill -0 $! 2>/dev/null && [ $t -lt 240 ]; do sleep 1; t=$((t+1)); done
  if ! kill -0 $! 2>/dev/null; then
    echo "$tag ok run $i: $t s" >> result.txt
    continue
  fi
  wl=
  for p in $(pgrep -f "kvmlockprof workload"); do
    grep -q record "/proc/$p/cmdline" || wl=$p        # the workload, not record
  done
  echo "$tag HANG run $i after $t s (workload pid $wl)" >> result.txt
  for j in 1 2 3; do
    for tk in /proc/"$wl"/task/*; do
      echo "== $j $tk $(cat "$tk/comm") wchan=$(cat "$tk/wchan")"; cat "$tk/stack"
    done
    sleep 2
  done > "$tag-hang$i.txt" 2>&1
  echo 1 > /proc/sys/kernel/sysrq; echo l > /proc/sysrq-trigger; echo w > /proc/sysrq-trigger
  kill -INT $!; sleep 30; kill -9 "$wl" $! 2>/dev/null
  break
done
