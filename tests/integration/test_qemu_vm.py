"""A real QEMU guest (TCG where KVM is not real) reaches host memory and a host eventfd through
``ivshmem-doorbell``, served by vmediad.ivshmem; plus the image builder's parts without QEMU.

The VM tests share one boot (module fixture): the guest runs the host's Python over virtio-9p,
finds the 1af4:1110 device, maps BAR0 and BAR2, reads what the host wrote, writes a pattern and
rings the host's vector 1 through the Doorbell register.  The host checks the pattern while the
guest is still running.  Where DKMS built igb_uio, the guest then binds it, rings vector 0 to say
it waits, and the host raises the guest's MSI-X vector 0, which ends the guest's blocking read.
"""

from __future__ import annotations

import json
import lzma
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmediad import ivshmem
from vmediad.tools import vmimage
from vmediad.tools.qemu import Guest, write_run_script

REGION_SIZE = 1 << 20
VECTORS = 2
HOST_OFF, GUEST_OFF, ECHO_OFF = 0x1000, 0x0, 0x2000  # where each side writes in BAR2
NONCE = bytes.fromhex("5e1f0c0ffee0dd1ec0de5a11ab1e0042")
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(512))
READY_MARK = "vmediad-guest: python up"
BOOT_TIMEOUT = 45.0

GUEST_SCRIPT = f'''
import sys
print("{READY_MARK}", flush=True)
import json, mmap, os, select, struct
from vmediad import ivshmem

share = sys.argv[1]
res = {{}}
dev = None
for name in sorted(os.listdir("/sys/bus/pci/devices")):
    p = "/sys/bus/pci/devices/" + name
    ids = (int(open(p + "/vendor").read(), 16), int(open(p + "/device").read(), 16))
    if ids == (ivshmem.PCI_VENDOR_ID, ivshmem.PCI_DEVICE_ID):
        dev = p
res["device"] = dev
with open(dev + "/enable", "w") as f:  # memory decoding on, with no driver bound
    f.write("1")
fd0 = os.open(dev + "/resource0", os.O_RDWR | os.O_SYNC)
bar0 = mmap.mmap(fd0, ivshmem.BAR0_SIZE)
regs = memoryview(bar0).cast("I")  # 32-bit accesses: QEMU's registers take 4-byte writes only
fd2 = os.open(dev + "/resource2", os.O_RDWR | os.O_SYNC)
size = os.fstat(fd2).st_size
bar2 = mmap.mmap(fd2, size)
res["bar2_size"] = size
res["iv_position"] = regs[ivshmem.REG_IV_POSITION // 4]
nonce = bytes(bar2[{HOST_OFF}:{HOST_OFF} + 16])
res["host_nonce"] = nonce.hex()
bar2[{GUEST_OFF}:{GUEST_OFF} + {len(PATTERN)}] = bytes((i * 7 + 3) & 0xFF for i in range({len(PATTERN)}))
bar2[{ECHO_OFF}:{ECHO_OFF} + 16] = nonce
# BAR2 is RAM shared with the host; the Doorbell write after it is trapped by QEMU, which then
# writes the host's eventfd: the host sees the pattern once its eventfd fires.
regs[ivshmem.REG_DOORBELL // 4] = ivshmem.doorbell_value(0, 1)
res["rang"] = 1

if os.path.isdir("/sys/bus/pci/drivers/igb_uio"):
    with open("/sys/bus/pci/drivers/igb_uio/new_id", "w") as f:
        f.write("%04x %04x" % (ivshmem.PCI_VENDOR_ID, ivshmem.PCI_DEVICE_ID))
    uio = os.listdir(dev + "/uio")[0]
    ufd = os.open("/dev/" + uio, os.O_RDWR)
    os.write(ufd, struct.pack("<I", 1))  # unmask the vector
    # Only now, with MSI-X enabled and unmasked, tell the host it may interrupt (vector 0):
    # an interrupt raised before MSI-X is on is dropped by QEMU.
    regs[ivshmem.REG_DOORBELL // 4] = ivshmem.doorbell_value(0, 0)
    ready, _, _ = select.select([ufd], [], [], 20)
    res["msix_count"] = struct.unpack("<I", os.read(ufd, 4))[0] if ready else None
with open(share + "/result.json", "w") as f:
    json.dump(res, f)
'''


def _image_skip_reason() -> str | None:
    if vmimage.find_kernel() is None:
        return "no /boot/vmlinuz-* with modules (run scripts/setup-vm.sh as root)"
    try:
        vmimage.find_busybox()
    except vmimage.VmImageError as e:
        return str(e)
    return None


def _vm_skip_reason() -> str | None:
    if vmimage.qemu_binary() is None:
        return "qemu-system-x86_64 not installed (run scripts/setup-vm.sh as root)"
    return _image_skip_reason()


needs_image = pytest.mark.skipif(_image_skip_reason() is not None, reason=_image_skip_reason() or "")
needs_vm = pytest.mark.skipif(_vm_skip_reason() is not None, reason=_vm_skip_reason() or "")
needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio binary to read an archive back")


@dataclass
class VmRun:
    image: vmimage.VmImage
    accel: vmimage.Accel
    client_id: int
    pattern_seen: bytes  # BAR2 bytes read by the host while the guest ran
    echo_seen: bytes
    doorbell_1: int
    doorbell_0: int | None  # None: no igb_uio in the image
    status: int | None
    qemu_code: int
    boot_s: float
    total_s: float
    result: dict[str, Any]
    console: str


@pytest.fixture(scope="module")
def vm_run() -> Iterator[VmRun]:
    share = Path(tempfile.mkdtemp(prefix="vmd-vm-"))
    sock = share / "ivshmem.sock"
    shm_fd = ivshmem.create_region(REGION_SIZE)
    region = mmap.mmap(shm_fd, REGION_SIZE)
    region[HOST_OFF:HOST_OFF + 16] = NONCE
    image = vmimage.build_image()
    accel = vmimage.detect_accel()
    (share / "guest.py").write_text(GUEST_SCRIPT)
    write_run_script(share, [sys.executable, str(share / "guest.py"), str(share)], cwd=Path.cwd())
    argv = vmimage.qemu_command(image, share, accel=accel, ivshmem_socket=sock, vectors=VECTORS)
    try:
        with ivshmem.IvshmemServer(sock, shm_fd, VECTORS) as server, Guest(argv) as guest:
            try:
                boot = guest.wait_line(READY_MARK, BOOT_TIMEOUT)
                client = server.wait_client(5)
                rang = server.wait_doorbell(1, 20)
                pattern = bytes(region[GUEST_OFF:GUEST_OFF + len(PATTERN)])
                echo = bytes(region[ECHO_OFF:ECHO_OFF + 16])
                rang0: int | None = None
                if any(Path(m).name.startswith("igb_uio.ko") for m in image.modules):
                    rang0 = server.wait_doorbell(0, 20)
                    if rang0:
                        server.interrupt(client.id, 0)
                code = guest.wait(30)
            except (TimeoutError, OSError) as e:
                pytest.fail(f"{e}\n{guest.describe()}")
            run = VmRun(image, accel, client.id, pattern, echo, rang, rang0, guest.exit_status, code, boot.t,
                        guest.lines[-1].t if guest.lines else 0.0,
                        json.loads((share / "result.json").read_text()) if (share / "result.json").exists() else {},
                        "\n".join(ln.text for ln in guest.lines))
        print(f"\nVM ({accel.name}, {'PVH vmlinux' if image.pvh else 'vmlinuz'}): boot to the first guest "
              f"Python line {run.boot_s:.2f} s, guest done after {run.total_s:.2f} s")
        yield run
    finally:
        region.close()
        os.close(shm_fd)
        shutil.rmtree(share, ignore_errors=True)


@needs_vm
def test_guest_maps_bars_writes_region_and_rings_the_host(vm_run: VmRun) -> None:
    assert vm_run.status == 0, vm_run.console
    assert vm_run.qemu_code == 0
    r = vm_run.result
    assert r["device"] is not None and r["bar2_size"] == REGION_SIZE
    assert r["iv_position"] == vm_run.client_id == 1  # the first client after the server's peer 0
    assert r["host_nonce"] == NONCE.hex()  # the guest read what the host wrote
    # The host read these while the guest was still running, right after its eventfd fired.
    assert vm_run.doorbell_1 == 1
    assert vm_run.pattern_seen == PATTERN
    assert vm_run.echo_seen == NONCE


@needs_vm
def test_msix_interrupt_reaches_a_blocking_read_in_the_guest(vm_run: VmRun) -> None:
    if vm_run.doorbell_0 is None:
        pytest.skip("igb_uio not built for the guest kernel (dpdk-kmods-dkms): guests poll, no MSI-X")
    assert vm_run.doorbell_0 == 1
    assert vm_run.result["msix_count"] == 1, vm_run.console


@needs_vm
def test_tcg_unless_kvm_is_real_and_boot_time_is_measured(vm_run: VmRun) -> None:
    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" not in flags and " svm" not in flags:
        assert vm_run.accel.name == "tcg"
    assert vm_run.image.pvh == (vm_run.image.kernel.name == "vmlinux")
    assert 0 < vm_run.boot_s < BOOT_TIMEOUT
    assert vm_run.boot_s <= vm_run.total_s


# ---------------------------------------------------------------- the image builder, without QEMU


def _cpuinfo(tmp: Path, flags: str) -> Path:
    p = tmp / "cpuinfo"
    p.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\n")
    return p


def test_accel_is_kvm_only_with_flags_module_and_device(tmp_path: Path) -> None:
    mods = tmp_path / "module"
    (mods / "kvm").mkdir(parents=True)
    (mods / "kvm_pvm").mkdir()
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    # A software hypervisor: /dev/kvm and kvm_pvm, no vmx/svm.
    a = vmimage.detect_accel(_cpuinfo(tmp_path, "hypervisor"), mods, kvm)
    assert (a.name, a.reason) == ("tcg", "no vmx/svm in the CPU flags: no hardware virtualisation")
    a = vmimage.detect_accel(_cpuinfo(tmp_path, "vmx"), mods, kvm)
    assert (a.name, a.reason) == ("tcg", "neither kvm_intel nor kvm_amd is loaded")
    (mods / "kvm_amd").mkdir()
    a = vmimage.detect_accel(_cpuinfo(tmp_path, "svm"), mods, tmp_path / "missing")
    assert a.name == "tcg" and "missing or not readable" in a.reason
    a = vmimage.detect_accel(_cpuinfo(tmp_path, "svm"), mods, kvm)
    assert (a.name, a.reason) == ("kvm", f"kvm_amd loaded, {kvm} usable")


def _elf_with_note(name: bytes, ntype: int) -> bytes:
    """A minimal ELF64 LE with one PT_NOTE segment holding one note."""
    namez = name + b"\0"
    note = (len(namez).to_bytes(4, "little") + (4).to_bytes(4, "little") + ntype.to_bytes(4, "little")
            + namez + b"\0" * (-len(namez) % 4) + b"\0\0\x10\x01")
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    ehdr[0x20:0x28] = (64).to_bytes(8, "little")  # e_phoff
    ehdr[0x36:0x38] = (56).to_bytes(2, "little")  # e_phentsize
    ehdr[0x38:0x3A] = (1).to_bytes(2, "little")  # e_phnum
    phdr = bytearray(56)
    phdr[0:4] = (4).to_bytes(4, "little")  # PT_NOTE
    phdr[8:16] = (120).to_bytes(8, "little")  # p_offset
    phdr[32:40] = len(note).to_bytes(8, "little")  # p_filesz
    return bytes(ehdr + phdr) + note


def _bzimage(payload: bytes, *, header: bool) -> bytes:
    setup_sects = 3
    img = bytearray(b"\x90" * ((setup_sects + 1) * 512 + 100))  # 100 bytes of decompressor code
    if header:
        img[0x1F1] = setup_sects
        img[0x202:0x206] = b"HdrS"
        img[0x248:0x250] = (100).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
    return bytes(img) + payload + b"\0" * 64  # trailing bytes after the stream, as in a real bzImage


def test_extract_vmlinux_finds_the_payload_by_header_and_by_magic() -> None:
    elf = _elf_with_note(b"Xen", vmimage.XEN_ELFNOTE_PHYS32_ENTRY) + b"kernel text" * 100
    xz = lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert vmimage.extract_vmlinux(_bzimage(xz, header=True)) == elf
    gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    assert vmimage.extract_vmlinux(_bzimage(gz.compress(elf) + gz.flush(), header=False)) == elf
    assert vmimage.extract_vmlinux(_bzimage(lzma.compress(b"not an elf", format=lzma.FORMAT_XZ),
                                            header=True)) is None
    assert vmimage.has_pvh_note(elf)
    assert vmimage.is_static_elf(elf)  # no PT_INTERP
    assert not vmimage.is_static_elf(Path(os.path.realpath(sys.executable)).read_bytes()[:4096])  # dynamic
    assert not vmimage.has_pvh_note(_elf_with_note(b"Xen", 17))
    assert not vmimage.has_pvh_note(_elf_with_note(b"Linux", vmimage.XEN_ELFNOTE_PHYS32_ENTRY))


def test_modules_come_after_their_dependencies(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n")
    assert vmimage.resolve_modules(tmp_path, ["9pnet_virtio", "9p", "not_a_module"]) == [
        "kernel/net/9p/9pnet.ko", "kernel/net/9p/9pnet_virtio.ko", "kernel/fs/netfs/netfs.ko",
        "kernel/fs/fscache/fscache.ko", "kernel/fs/9p/9p.ko"]


@needs_cpio
def test_cpio_archive_reads_back_with_gnu_cpio(tmp_path: Path) -> None:
    E = vmimage.CpioEntry
    archive = vmimage.make_cpio([
        E("bin", vmimage.S_IFDIR | 0o755), E("bin/tool", vmimage.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        E("bin/sh", vmimage.S_IFLNK | 0o777, b"tool"), E("odd", vmimage.S_IFREG | 0o644, b"12345"),
    ])
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=out, check=True)
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.stat(out / "bin/tool").st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin/sh") == "tool"
    assert (out / "odd").read_bytes() == b"12345"
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["bin", "bin/tool", "bin/sh", "odd"]


@needs_image
@needs_cpio
def test_image_is_cached_and_rebuilt_when_the_init_script_changes(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first = vmimage.build_image(tmp_path)
    assert first.pvh and first.kernel == tmp_path / first.kernel_version / "vmlinux"
    assert vmimage.has_pvh_note(first.kernel.read_bytes())
    stamp = first.initramfs.stat().st_mtime_ns
    again = vmimage.build_image(tmp_path)
    assert again == first and first.initramfs.stat().st_mtime_ns == stamp  # a cache hit writes nothing
    monkeypatch.setattr(vmimage, "INIT_SCRIPT", vmimage.INIT_SCRIPT + "# changed\n")
    changed = vmimage.build_image(tmp_path)
    assert changed.initramfs != first.initramfs and changed.initramfs.is_file()
    assert not first.initramfs.exists()  # the stale one is gone
    listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=changed.initramfs.open("rb"),
                             capture_output=True, check=True).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console", "modules.load"} <= set(listing)
    assert any(p.endswith("/9p.ko") for p in listing) and any(p.endswith("/9pnet_virtio.ko") for p in listing)


def test_qemu_command_carries_accel_share_and_ivshmem(tmp_path: Path) -> None:
    img = vmimage.VmImage("6.1.0-test", Path("/c/vmlinux"), True, Path("/c/initramfs-x.cpio"), ())
    cmd = vmimage.qemu_command(img, tmp_path, accel=vmimage.Accel("tcg", "test"), ivshmem_socket=tmp_path / "s",
                               vectors=4, qemu="/usr/bin/qemu-system-x86_64")
    assert cmd[:5] == ["/usr/bin/qemu-system-x86_64", "-accel", "tcg", "-M", "pc"]
    assert cmd[cmd.index("-kernel") + 1] == "/c/vmlinux"
    assert f"vmediad.share={tmp_path.resolve()}" in cmd[cmd.index("-append") + 1].split()
    assert "ivshmem-doorbell,chardev=ivshmem,vectors=4" in cmd
    assert f"socket,id=ivshmem,path={tmp_path / 's'}" in cmd
    bad = tmp_path / "a,b"
    bad.mkdir()
    with pytest.raises(vmimage.VmImageError, match="characters QEMU"):
        vmimage.qemu_command(img, bad, accel=vmimage.Accel("tcg", "test"), qemu="/usr/bin/true")


def test_run_script_quotes_arguments(tmp_path: Path) -> None:
    path = write_run_script(tmp_path, ["/usr/bin/printf", "%s|", "a b", "it's"], env={"X": "1 2"})
    out = subprocess.run(["/bin/sh", str(path)], capture_output=True, check=True, text=True).stdout
    assert out == "a b|it's|"
    assert path.name == vmimage.RUN_SCRIPT
    assert "export X='1 2'" in path.read_text()

