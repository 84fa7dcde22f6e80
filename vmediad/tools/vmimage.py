"""The guest image of a real VM: a kernel, a small initramfs, the QEMU command line, KVM or TCG.

There is no disk image.  The guest boots the newest Debian kernel in ``/boot`` with an
initramfs made here (busybox-static plus the virtio-9p modules), mounts the host's own ``/``
read-only over virtio-9p, mounts a writable share at the same path as on the host, chroots into
the host's root and runs one script from the share: the guest runs the host's Python, venv and
code at the host's paths.  Then it powers off.

Built once and cached under ``$XDG_CACHE_HOME/vmediad/vm/<kernel version>/``:

- ``vmlinux``: the uncompressed kernel, extracted from ``vmlinuz``.  QEMU boots it directly
  through its PVH entry point, which halves the boot time under TCG.  Kept only when the ELF
  carries the PVH note; otherwise QEMU boots ``vmlinuz``.
- ``initramfs-<hash>.cpio``: keyed by a hash of the init script, the modules and busybox.  Left
  uncompressed: the kernel unpacks it without a decompressor, which is the faster boot.

See docs/vms.md.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

BUILDER_VERSION = 1  # part of the initramfs key: bump when the layout built here changes

# Mount tags of the two virtio-9p devices; the init script below matches them.
ROOT_TAG = "hostroot"
SHARE_TAG = "share"
RUN_SCRIPT = ".vmediad-run.sh"  # in the share: what the guest runs (``/bin/sh`` in the chroot)
EXIT_MARKER = "vmediad-exit="  # the init script's last console line: the run script's exit status

# Loaded in this order by the init script; each one's dependencies come first (modules.dep).
BASE_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
OPTIONAL_MODULES = ("igb_uio",)  # built by DKMS (scripts/setup-vm.sh); brings MSI-X to /dev/uioN

INIT_SCRIPT = f"""#!/bin/sh
# vmediad guest init (PID 1): mount the host's root read-only over 9p, the share read-write at
# the host's path, run the share's {RUN_SCRIPT} in a chroot, print its exit status, power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r mod args; do
  insmod "/lib/modules/$mod" $args || echo "vmediad-init: insmod $mod failed"
done < /modules.load
share=
for arg in $(cat /proc/cmdline); do
  case "$arg" in vmediad.share=*) share="${{arg#vmediad.share=}}" ;; esac
done
die() {{ echo "vmediad-init: $*"; echo "{EXIT_MARKER}255"; poweroff -f; }}
[ -n "$share" ] || die "no vmediad.share= on the kernel command line"
mkdir -p /newroot
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro,cache=loose" {ROOT_TAG} /newroot || die "cannot mount the host root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mount -t 9p -o "$opts,rw" {SHARE_TAG} "/newroot$share" || die "cannot mount the share at $share"
[ -f "/newroot$share/{RUN_SCRIPT}" ] || die "no $share/{RUN_SCRIPT}"
chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
  HOME="$share" TMPDIR="$share" LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 VMEDIAD_GUEST=1 \\
  /bin/sh "$share/{RUN_SCRIPT}"
status=$?
sync
umount "/newroot$share" 2>/dev/null
echo "{EXIT_MARKER}$status"
poweroff -f
"""

# Applets the init script uses; each becomes a symlink to /bin/busybox.
APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "cat", "echo", "chroot", "sync", "poweroff")

# Fast-boot kernel parameters: serial console, no probing of devices the guest lacks.
KERNEL_ARGS = (
    "console=ttyS0", "quiet", "loglevel=3", "panic=-1", "mitigations=off", "8250.nr_uarts=1",
    "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "no_timer_check", "tsc=reliable", "random.trust_cpu=on",
    "cryptomgr.notests",
)


class VmImageError(RuntimeError):
    """The guest image cannot be built here (no kernel, no busybox, a path QEMU cannot take)."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path  # /lib/modules/<version>


@dataclass(frozen=True)
class VmImage:
    kernel_version: str
    kernel: Path  # the file QEMU boots: vmlinux (PVH) or vmlinuz
    pvh: bool
    initramfs: Path
    modules: tuple[str, ...]  # what the initramfs loads, in order (paths under /lib/modules)


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # one line: why this one


# ---------------------------------------------------------------- kernel


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version)]


def find_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> Kernel | None:
    """The newest ``vmlinuz-<version>`` in ``boot`` whose modules are installed, or None."""
    found = []
    for p in boot.glob("vmlinuz-*"):
        version = p.name[len("vmlinuz-"):]
        if p.is_file() and (modules_root / version / "modules.dep").is_file():
            found.append(Kernel(version, p, modules_root / version))
    return max(found, key=lambda k: _version_key(k.version), default=None)


_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)


def _decompress(kind: str, data: bytes) -> bytes | None:
    """Decompress the stream at the start of ``data`` (trailing bytes are ignored), or None."""
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    except (lzma.LZMAError, zlib.error, EOFError):
        return None
    zstd = shutil.which("zstd")  # the standard library has no zstd before Python 3.14
    if zstd is None:
        return None
    r = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=False)
    return r.stdout if r.stdout else None  # zstd complains about trailing bytes but writes the frame


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None (the logic of Linux's extract-vmlinux).

    The boot header names the payload (offset 0x248/0x24c, relative to the protected-mode code
    after the ``setup_sects`` sectors); failing that, every compression magic is tried in turn.
    """
    candidates: list[int] = []
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        setup_sects = bzimage[0x1F1] or 4
        payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
        start = (setup_sects + 1) * 512 + payload_offset
        if payload_length and start + payload_length <= len(bzimage):
            candidates.append(start)
    for _, magic in _MAGICS:
        pos = bzimage.find(magic)
        while pos >= 0:
            candidates.append(pos)
            pos = bzimage.find(magic, pos + 1)
    for pos in candidates:
        for kind, magic in _MAGICS:
            if bzimage.startswith(magic, pos):
                out = _decompress(kind, bzimage[pos:])
                if out is not None and out.startswith(b"\x7fELF"):
                    return out
    return None


XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU looks for


def has_pvh_note(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF carries Xen's PHYS32_ENTRY note (QEMU's PVH boot)."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        offset, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        pos, end = offset, min(offset + size, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


# ---------------------------------------------------------------- initramfs


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``names`` and their dependencies, dependencies first.

    A name missing from modules.dep is built into the kernel or absent: it is skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        stem = Path(path).name.split(".ko")[0]
        by_name.setdefault(stem.replace("-", "_"), path)
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):  # modules.dep lists the deepest dependency last
            visit(d)
        order.append(path)

    for name in names:
        found = by_name.get(name.replace("-", "_"))
        if found is not None:
            visit(found)
    return order


def _cpio_entry(name: str, mode: int, data: bytes = b"", *, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One cpio ``newc`` record (the format the kernel unpacks): fixed mtime and owner, so the
    archive's bytes depend only on its contents."""
    nameb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + nameb
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


class CpioEntry(NamedTuple):
    name: str  # relative, no leading slash
    mode: int  # file type and permission bits
    data: bytes = b""  # a symlink's data is its target
    rdev: tuple[int, int] = (0, 0)  # a device node's major, minor


def make_cpio(entries: Sequence[CpioEntry]) -> bytes:
    """A ``newc`` archive of ``entries`` in the given order (directories before what they hold)."""
    out = bytearray()
    for i, e in enumerate(entries, start=1):
        out += _cpio_entry(e.name, e.mode, e.data, ino=i, rdev=e.rdev)
    out += _cpio_entry("TRAILER!!!", 0, b"", ino=0)
    return bytes(out)


def is_static_elf(head: bytes) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP segment (no dynamic loader to
    bring into the initramfs).  ``head``: the file's first bytes, program headers included."""
    if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":
        return False
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phoff + phnum * phentsize > len(head):
        return False
    return all(struct.unpack_from("<I", head, phoff + i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def find_busybox() -> Path:
    for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if p.is_file():
            with p.open("rb") as f:
                if is_static_elf(f.read(4096)):
                    return p
    raise VmImageError("no static busybox (apt-get install busybox-static, or run scripts/setup-vm.sh)")


def module_order(kernel: Kernel) -> list[str]:
    """The modules the init script loads, in order: the 9p stack, then igb_uio if DKMS built it."""
    modules = resolve_modules(kernel.modules, BASE_MODULES)
    missing = [m for m in ("9p", "9pnet_virtio") if not any(Path(p).name.startswith(m + ".ko") for p in modules)]
    if missing:
        raise VmImageError(f"kernel {kernel.version} has no module {missing[0]}; the guest cannot mount 9p")
    return modules + [m for m in resolve_modules(kernel.modules, OPTIONAL_MODULES) if m not in modules]


def initramfs_contents(kernel: Kernel, busybox: Path) -> tuple[list[CpioEntry], tuple[str, ...]]:
    """The initramfs entries and the module paths the init script loads (in order)."""
    modules = module_order(kernel)
    load_lines = [m + (" intr_mode=msix" if Path(m).name.startswith("igb_uio.ko") else "") for m in modules]
    entries = [CpioEntry(d, S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")]
    entries.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))  # the kernel opens it for init's stdio
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox.read_bytes()))
    entries += [CpioEntry(f"bin/{a}", S_IFLNK | 0o777, b"busybox") for a in APPLETS]
    dirs: set[str] = set()
    for m in modules:
        parent = Path(m).parent
        for d in reversed([parent, *parent.parents]):
            if str(d) != "." and str(d) not in dirs:
                dirs.add(str(d))
                entries.append(CpioEntry(f"lib/modules/{d}", S_IFDIR | 0o755))
        entries.append(CpioEntry(f"lib/modules/{m}", S_IFREG | 0o644, (kernel.modules / m).read_bytes()))
    entries.append(CpioEntry("modules.load", S_IFREG | 0o644, "".join(line + "\n" for line in load_lines).encode()))
    entries.append(CpioEntry("init", S_IFREG | 0o755, INIT_SCRIPT.encode()))
    return entries, tuple(modules)


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmediad" / "vm"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p} {st.st_size} {st.st_mtime_ns}"


def build_image(cache: Path | None = None, *, kernel: Kernel | None = None) -> VmImage:
    """The cached guest image, built first if the kernel, the init script or a module changed."""
    kernel = kernel or find_kernel()
    if kernel is None:
        raise VmImageError("no /boot/vmlinuz-* with its modules (apt-get install linux-image-amd64, "
                           "or run scripts/setup-vm.sh)")
    d = (cache or cache_dir()) / kernel.version
    d.mkdir(parents=True, exist_ok=True)

    # The kernel: vmlinux when it can boot through PVH, else vmlinuz itself.
    vmlinux, stamp_file = d / "vmlinux", d / "vmlinux.source"
    want = _stamp(kernel.vmlinuz)
    if not (stamp_file.is_file() and stamp_file.read_text() == want):
        elf = extract_vmlinux(kernel.vmlinuz.read_bytes())
        if elf is not None and has_pvh_note(elf):
            _write_atomic(vmlinux, elf)
        else:
            vmlinux.unlink(missing_ok=True)
        _write_atomic(stamp_file, want.encode())
    pvh = vmlinux.is_file()

    busybox = find_busybox()
    h = hashlib.sha256(f"{BUILDER_VERSION}\n{INIT_SCRIPT}\n{_stamp(busybox)}\n".encode())
    loaded = tuple(module_order(kernel))
    for m in loaded:
        h.update(_stamp(kernel.modules / m).encode())
    initramfs = d / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if not initramfs.is_file():
        entries, _ = initramfs_contents(kernel, busybox)
        _write_atomic(initramfs, make_cpio(entries))
        for old in d.glob("initramfs-*.cpio"):
            if old != initramfs:
                old.unlink(missing_ok=True)
    return VmImage(kernel.version, vmlinux if pvh else kernel.vmlinuz, pvh, initramfs, loaded)


# ---------------------------------------------------------------- KVM or TCG


def detect_accel(cpuinfo: Path = Path("/proc/cpuinfo"), sys_module: Path = Path("/sys/module"),
                 dev_kvm: Path = Path("/dev/kvm")) -> Accel:
    """KVM only where it is a real hardware hypervisor; TCG everywhere else.

    ``/dev/kvm`` alone proves nothing: a software hypervisor (``kvm_pvm``) provides it too, and a
    stock kernel never reaches userspace on it.  Real KVM needs all three: ``vmx`` or ``svm`` in
    the CPU flags, ``kvm_intel`` or ``kvm_amd`` loaded, and ``/dev/kvm`` readable and writable."""
    try:
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError:
        flags = set()
    if not flags & {"vmx", "svm"}:
        return Accel("tcg", "no vmx/svm in the CPU flags: no hardware virtualisation")
    loaded = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).is_dir()]
    if not loaded:
        return Accel("tcg", "neither kvm_intel nor kvm_amd is loaded")
    if not dev_kvm.exists() or not os.access(dev_kvm, os.R_OK | os.W_OK):
        return Accel("tcg", f"{dev_kvm} is missing or not readable and writable")
    return Accel("kvm", f"{loaded[0]} loaded, {dev_kvm} usable")


# ---------------------------------------------------------------- QEMU command


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+\-]*$")  # no commas (QEMU's option syntax), no spaces


def qemu_command(image: VmImage, share: Path, *, accel: Accel | None = None, memory_mb: int = 512,
                 ivshmem_socket: Path | None = None, vectors: int = 2,
                 extra_kernel_args: Sequence[str] = (), qemu: str | None = None) -> list[str]:
    """The QEMU command line booting ``image`` to run ``share``'s run script.

    The guest console is QEMU's stdout (serial ttyS0).  With ``ivshmem_socket`` the VM gets an
    ``ivshmem-doorbell`` device whose region and eventfds come from the ivshmem server listening
    there (vmediad.ivshmem); ``vectors`` must equal the server's."""
    share = share.resolve()
    for p in (share, image.kernel, image.initramfs, *([ivshmem_socket] if ivshmem_socket else [])):
        if not _SAFE_PATH.match(str(p)):
            raise VmImageError(f"path {str(p)!r} has characters QEMU's options or the kernel command line cannot carry")
    accel = accel or detect_accel()
    binary = qemu or qemu_binary()
    if binary is None:
        raise VmImageError("qemu-system-x86_64 not found (apt-get install qemu-system-x86, or run scripts/setup-vm.sh)")
    cmd = [
        binary, "-accel", accel.name, "-M", "pc", "-cpu", "host" if accel.name == "kvm" else "max",
        "-smp", "1", "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", " ".join([*KERNEL_ARGS, f"vmediad.share={share}", *extra_kernel_args]),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=hostroot,mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id=share,path={share},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=share,mount_tag={SHARE_TAG}",
    ]
    if ivshmem_socket is not None:
        cmd += ["-chardev", f"socket,id=ivshmem,path={ivshmem_socket}",
                "-device", f"ivshmem-doorbell,chardev=ivshmem,vectors={vectors}"]
    return cmd
