#!/bin/busybox sh
# PID 1 of the iommufd test VM, packed into the initramfs by `cargo xtask vm-test` / `vm-demo`.
#
# The kernel command line passes IOMMUFD_TEST_IOMMU (intel|virtio), IOMMUFD_TEST_KERNEL (the booted
# kernel's release, e.g. 6.12.95), IOMMUFD_VM_MODE (test|demo|bench) and, where the kernel's mock IOMMU
# devices cannot be tested under this IOMMU, IOMMUFD_TEST_NO_MOCK (the reason) as environment variables.
# Results go to two places: the console (ttyS0, shared with kernel messages) for
# people, and ttyS1 (only this script writes there) for the host to parse, one marker a line:
#   begin NAME | result NAME <libtest summary line> | end NAME rc=N | done status=N | error TEXT
# The exit status is written to QEMU's isa-debug-exit port (0xf4) through /dev/port; `poweroff -f` is
# the fallback.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root

mkdir -p /proc /sys /dev /tmp /root
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
        run_one "example/${e##*/}" "$e"
    done
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
