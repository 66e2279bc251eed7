#!/bin/busybox sh
# PID 1 of the iommufd test VM, packed into the initramfs by `cargo xtask vm-test` / `vm-demo`.
#
# The kernel command line passes IOMMUFD_TEST_IOMMU (intel|virtio), IOMMUFD_TEST_KERNEL (the booted
# kernel's release, e.g. 6.12.95), IOMMUFD_VM_MODE (test|demo|bench) and, where the kernel's mock IOMMU
# devices cannot be tested under this IOMMU, IOMMUFD_TEST_NO_MOCK (the reason), and on a kernel older than
# the pinned one IOMMUFD_TEST_OLDER_KERNEL=1, as environment variables.
# Results go to two places: the console (ttyS0, shared with kernel messages) for
# people, and ttyS1 (only this script writes there) for the host to parse, one marker a line:
#   begin NAME | result NAME <libtest summary line> | end NAME rc=N | done status=N | error TEXT
# The exit status is written to QEMU's isa-debug-exit port (0xf4) through /dev/port; `poweroff -f` is
# the fallback.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root

mkdir -p /proc /sys /dev /tmp /root /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages
mount -t hugetlbfs hugetlbfs /dev/hugepages

say() {
    echo "@@xtask $*"
    echo "$*" >/dev/ttyS1
}

finish() {
    say "done status=$1"
    sync
    # QEMU's isa-debug-exit turns a byte V written to the port into the exit code (V << 1) | 1.
    printf "\\$(printf '%03o' "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    sleep 1
    poweroff -f
}

fail() {
    say "error $*"
    finish 1
}

stty -F /dev/ttyS1 raw -echo 2>/dev/null
say "init iommu=$IOMMUFD_TEST_IOMMU kernel=$(uname -r) mode=$IOMMUFD_VM_MODE uptime=$(cut -d' ' -f1 /proc/uptime)s"

case "$(uname -r)" in
"$IOMMUFD_TEST_KERNEL" | "$IOMMUFD_TEST_KERNEL"[+-]*) ;;
*) fail "IOMMUFD_TEST_KERNEL is '$IOMMUFD_TEST_KERNEL' but the booted kernel is $(uname -r)" ;;
esac

case "$IOMMUFD_TEST_IOMMU" in
intel) [ -e /sys/class/iommu/dmar0 ] || fail "intel-iommu requested but /sys/class/iommu/dmar0 is missing" ;;
virtio) ;;
*) fail "IOMMUFD_TEST_IOMMU must be intel or virtio, got '$IOMMUFD_TEST_IOMMU'" ;;
esac
[ -c /dev/iommu ] || fail "/dev/iommu is missing"

# Bind the edu device (1234:11e8) to vfio-pci.
edu=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
        edu=${d##*/}
    fi
done
[ -n "$edu" ] || fail "no edu device (1234:11e8) on the PCI bus"
echo vfio-pci >"/sys/bus/pci/devices/$edu/driver_override"
echo "$edu" >/sys/bus/pci/drivers_probe
cdev=$(ls "/sys/bus/pci/devices/$edu/vfio-dev" 2>/dev/null)
[ -n "$cdev" ] && [ -c "/dev/vfio/devices/$cdev" ] || fail "binding $edu to vfio-pci gave no /dev/vfio/devices/vfioN"
group=$(readlink "/sys/bus/pci/devices/$edu/iommu_group")
group=${group##*/}
behind=$(readlink "/sys/bus/pci/devices/$edu/iommu")
behind=${behind##*/}
# intel-iommu units are dmarN; a virtio-iommu is named after its PCI function (vendor 0x1af4).
case "$IOMMUFD_TEST_IOMMU:$behind" in
intel:dmar*) ;;
virtio:*) [ "$(cat "/sys/bus/pci/devices/$behind/vendor" 2>/dev/null)" = 0x1af4 ] ||
    fail "edu is behind IOMMU '$behind', not a virtio-iommu" ;;
*) fail "edu is behind IOMMU '$behind', not the $IOMMUFD_TEST_IOMMU IOMMU" ;;
esac

export IOMMUFD_TEST_VM=1
export IOMMUFD_TEST_EDU_BDF="$edu"
export IOMMUFD_TEST_EDU_CDEV="/dev/vfio/devices/$cdev"
export IOMMUFD_TEST_EDU_GROUP="$group"
export IOMMUFD_TEST_IOMMU IOMMUFD_TEST_KERNEL
if [ -n "$IOMMUFD_TEST_NO_MOCK" ]; then export IOMMUFD_TEST_NO_MOCK; fi
export RUST_BACKTRACE=1
echo "edu $edu (behind $behind) -> vfio-pci, cdev /dev/vfio/devices/$cdev, group $group; $(grep HugePages_Total /proc/meminfo)"

# Runs one binary, streaming its output to the console; reports its libtest summary lines and exit code.
run_one() {
    name=$1
    shift
    say "begin $name"
    { (cd /tmp && "$@"); echo $? >/tmp/rc; } 2>&1 | tee /tmp/out
    rc=$(cat /tmp/rc)
    grep '^test result:' /tmp/out | while read -r line; do say "result $name $line"; done
    say "end $name rc=$rc"
    [ "$rc" = 0 ] || status=1
}

# The hardware tier (`cargo xtask hw-test --bind`) rehearsed on virtio-rng, a device that starts on its
# Linux driver: lsiommu lists it, vfio-bind (the same bind logic as hw-test's) takes it to vfio-pci for
# each generic test binary and restores it after, even when the tests fail or the command is killed,
# and after every restore the device works again with virtio_rng. Each check is one result.
PATH=$PATH:/tools
hw_state=/run/iommufd-tools/rehearsal.state

rng_on_virtio() {
    [ "$(basename "$(readlink "/sys/bus/pci/devices/$rng/driver")")" = virtio-pci ] ||
        { echo "$rng is not on virtio-pci"; return 1; }
    [ "$(cat "/sys/bus/pci/devices/$rng/driver_override")" = "(null)" ] ||
        { echo "driver_override of $rng was not cleared"; return 1; }
    grep -q virtio_rng /sys/class/misc/hw_random/rng_available ||
        { echo "rng_available lacks virtio_rng: $(cat /sys/class/misc/hw_random/rng_available)"; return 1; }
    n=$(head -c 16 /dev/hwrng | wc -c)
    [ "$n" = 16 ] || { echo "/dev/hwrng gave $n bytes, not 16"; return 1; }
    [ ! -e "$hw_state" ] || { echo "$hw_state still records: $(cat "$hw_state")"; return 1; }
    echo "$rng on virtio-pci, driver_override clear, /dev/hwrng gives bytes"
}

check_lsiommu() {
    lsiommu >/tmp/lsiommu.txt || return 1
    cat /tmp/lsiommu.txt
    want() { grep -Eq "$1" /tmp/lsiommu.txt || { echo "lsiommu printed no line matching: $1"; return 1; }; }
    case "$IOMMUFD_TEST_IOMMU" in
    intel) want '^IOMMU dmar[0-9]+ \(intel-iommu\): groups' ;;
    virtio) want '^IOMMU [0-9a-f:.]+ \(virtio_iommu\): groups' ;;
    esac || return 1
    # The pinned kernel has every ioctl; an older one a subset.
    if [ -n "$IOMMUFD_TEST_OLDER_KERNEL" ]; then
        want '^iommufd: /dev/iommu, [0-9]+ of 22 ioctls$'
    else
        want '^iommufd: /dev/iommu, 22 of 22 ioctls$'
    fi &&
        want "^IOMMU Group $group  $edu  Unclassified device \\[00ff\\] \\[1234:11e8\\]  vfio-pci$" &&
        want "^IOMMU Group [0-9]+  $rng  Unclassified device \\[00ff\\] \\[1af4:1044\\]  virtio-pci$" &&
        want '^VFIO: vfio-pci loaded: yes, device cdevs \(/dev/vfio/devices\): yes$' || return 1
    lsiommu --json >/tmp/lsiommu.json || return 1
    grep -F '"name": "0000:' /tmp/lsiommu.json
    wantj() { grep -Fq "$1" /tmp/lsiommu.json || { echo "lsiommu --json has no line with: $1"; return 1; }; }
    wantj '"available": true' || return 1
    grep -F "\"name\": \"$edu\"" /tmp/lsiommu.json | grep -Fq '"driver": "vfio-pci"' ||
        { echo "lsiommu --json: edu $edu is not listed on vfio-pci"; return 1; }
    grep -F "\"name\": \"$rng\"" /tmp/lsiommu.json | grep -Fq '"driver": "virtio-pci"' ||
        { echo "lsiommu --json: virtio-rng $rng is not listed on virtio-pci"; return 1; }
}

check_refusals() {
    vfio-bind --state "$hw_state" "../$rng" 2>/tmp/refused && { echo "a path was accepted as an address"; return 1; }
    grep -q "is not a PCI address" /tmp/refused || { echo "refused for another reason: $(cat /tmp/refused)"; return 1; }
    vfio-bind --state "$hw_state" --dry-run "$rng" | tee /tmp/plan
    grep -q "^$rng: virtio-pci -> vfio-pci" /tmp/plan || { echo "the dry run did not plan the rebind"; return 1; }
    rng_on_virtio
}

check_keep_and_restore() {
    vfio-bind --state "$hw_state" "$rng" || return 1
    [ "$(basename "$(readlink "/sys/bus/pci/devices/$rng/driver")")" = vfio-pci ] || { echo "not on vfio-pci"; return 1; }
    [ -n "$(ls "/sys/bus/pci/devices/$rng/vfio-dev")" ] || { echo "no VFIO cdev for $rng"; return 1; }
    grep -q "^$rng driver=virtio-pci override=-$" "$hw_state" || { echo "state file: $(cat "$hw_state")"; return 1; }
    vfio-bind --state "$hw_state" --restore || return 1
    rng_on_virtio
}

# A test that fails for real (the group it is told to expect is edu's), then a command killed by a
# signal: vfio-bind passes the status on and the device is back on its driver each time.
check_failure_path() {
    # Its output is indented: its libtest summary is not one of this run's results.
    IOMMUFD_TEST_DEVICE=$rng IOMMUFD_TEST_EDU_GROUP=$group vfio-bind --state "$hw_state" "$rng" -- \
        /tests/device --include-ignored --test-threads=1 --exact group_facts_match_sysfs >/tmp/fail.out 2>&1
    rc=$?
    sed 's/^/    | /' /tmp/fail.out
    [ "$rc" = 101 ] || { echo "a failing test gave status $rc, not libtest's 101"; return 1; }
    # It failed for the reason it was set up to: the group it was told is edu's, not virtio-rng's.
    grep -q "right: \"$group\"" /tmp/fail.out || { echo "the test failed for another reason"; return 1; }
    rng_on_virtio || return 1
    vfio-bind --state "$hw_state" "$rng" -- sh -c 'kill -9 $$'
    rc=$?
    [ "$rc" = 137 ] || { echo "a killed command gave status $rc, not 137"; return 1; }
    rng_on_virtio
}

hw_rehearsal() {
    rng=
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1044 ]; then
            rng=${d##*/}
        fi
    done
    [ -n "$rng" ] || { say "error no virtio-rng device (1af4:1044) on the PCI bus"; status=1; return; }
    echo "hardware-tier rehearsal on virtio-rng $rng"
    run_one check/rng-before rng_on_virtio
    run_one check/lsiommu check_lsiommu
    run_one check/vfio-bind-refusals check_refusals
    run_one check/vfio-bind-keep-and-restore check_keep_and_restore
    eval "set -- $(cat /etc/xtask-hw-skip) \"\$@\""
    for t in $(cat /etc/xtask-hw-tests); do
        run_one "hw/$t" env -u IOMMUFD_TEST_EDU_BDF -u IOMMUFD_TEST_EDU_CDEV -u IOMMUFD_TEST_EDU_GROUP \
            IOMMUFD_TEST_DEVICE="$rng" vfio-bind --state "$hw_state" "$rng" -- \
            "/tests/$t" --include-ignored --test-threads=1 "$@"
    done
    run_one check/rng-after-hw-tier rng_on_virtio
    run_one check/vfio-bind-failure-path check_failure_path
}

# Runs one example (one check: it passes when it exits 0). Where mock devices cannot be tested, an
# example on the mock is skipped by design; on a kernel older than the pinned one, status 77 (the
# kernel lacks what the example needs, and it said which) is too. Skips print `@@xtask skip` lines on
# the console, which xtask counts.
run_example() {
    name=example/${1##*/}
    if [ -n "$IOMMUFD_TEST_NO_MOCK" ] && grep -qx "${1##*/}" /etc/xtask-mock-examples; then
        echo "@@xtask skip $name $IOMMUFD_TEST_NO_MOCK"
        say "begin $name"
        say "end $name rc=0"
        return
    fi
    say "begin $name"
    { (cd /tmp && "$1"); echo $? >/tmp/rc; } 2>&1 | tee /tmp/out
    rc=$(cat /tmp/rc)
    if [ "$rc" = 77 ] && [ -n "$IOMMUFD_TEST_OLDER_KERNEL" ]; then
        echo "@@xtask skip $name unsupported-by-linux-$IOMMUFD_TEST_KERNEL"
        rc=0
    fi
    say "end $name rc=$rc"
    [ "$rc" = 0 ] || status=1
}

status=0
case "$IOMMUFD_VM_MODE" in
demo)
    [ -x /examples/edu_dma ] || fail "no edu_dma example in the initramfs"
    run_one example/edu_dma /examples/edu_dma
    ;;
test)
    # Extra arguments for every test binary (`cargo xtask vm-test -- ARGS`), shell-quoted by xtask.
    eval "set -- $(cat /etc/xtask-test-args)"
    for t in /tests/*; do
        [ -x "$t" ] || continue
        run_one "test/${t##*/}" "$t" --include-ignored --test-threads=1 "$@"
    done
    # Every example is one check: it passes when it exits 0 (each finds its device through the
    # IOMMUFD_TEST_* variables above, or uses the mock IOMMU).
    for e in /examples/*; do
        [ -x "$e" ] || continue
        run_example "$e"
    done
    hw_rehearsal "$@"
    ;;
bench)
    for b in /bench/*; do
        [ -x "$b" ] || fail "no benchmark in the initramfs"
        run_one "bench/${b##*/}" "$b"
    done
    ;;
*) fail "IOMMUFD_VM_MODE must be test, demo or bench, got '$IOMMUFD_VM_MODE'" ;;
esac
finish $status
