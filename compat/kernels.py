"""Run the compatibility matrix on other Linux kernels under qemu, and merge it with this machine's.

    python compat/kernels.py                          # this kernel, Debian's 6.1 and 6.12 cloud kernels
    python compat/kernels.py --kernel 6.1 --json      # merged JSON Lines on stdout
    python compat/kernels.py --output matrix.jsonl -- --profile native   # options after -- go to the matrix

Each kernel is a Debian package (`--kernel 6.1` picks the newest `linux-image-6.1.<n>-<abi>-cloud-amd64`
apt knows, `--kernel 6.12` the newest `linux-image-6.12.<n>+deb12-cloud-amd64`; a full package name works
too), fetched with `apt-get download` and booted with software emulation (`qemu-system-x86_64 -accel
tcg,thread=single -cpu max`: nested KVM stalls at boot on the machines this was written on). The cloud
kernels have no 9p, so the guest's whole userland travels in an initramfs: busybox-static for /init,
this interpreter with its standard library and the shared libraries `ldd` names, and vrange built from
this checkout (`pip install --target`) with numpy. /init mounts proc, sysfs, devtmpfs (which holds /dev/userfaultfd on
6.1+), a /tmp and cgroup2, runs `python <guest command>`, writes its standard output to the second
serial port and powers off. Every boot is bounded by `--timeout`; the console log is kept in the cache.

The guest command (`--guest-command`, default `-m vrange compat --json`) prints JSON Lines, one object
per cell: scenario, backend, profile, kernel, result (pass, fail, n/a), reason. This machine's column
runs the same command with the same build. The older `compat/run.py --json` document is read too.

Downloaded packages, extracted kernels and built images are cached in `--cache` (default
~/.cache/vrange-compat); an image is rebuilt when its inputs change (this checkout, the interpreter,
busybox, the guest packages).

Exit status: 0 when every cell that ran passed (kernels that cannot run here are skipped with the
reason: no qemu-system-x86_64, no busybox-static, no package; `--install` apt-installs the first two),
1 when a cell failed, 2 when a kernel booted but gave no results (timeout, crash: see its log).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KERNELS = ("6.1", "6.12")
DEFAULT_GUEST_COMMAND = "-m vrange compat --json"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vrange-compat"
DEFAULT_GUEST_PACKAGES = ("numpy",)
GUEST_CELL_TIMEOUT_S = 900
"""The matrix's per-cell timeout inside a guest, unless the matrix options name one: software
emulation runs 20 to 35 times slower than this machine, so the 60 s default would call the slowest
cells (the memory-pressure cache) hung."""
# Measured on a 2-vCPU machine: a whole matrix took about 6 minutes under TCG. The bound is generous
# because the CPU may be shared; a run that needs longer is stuck.
DEFAULT_TIMEOUT = 1800
RESULTS = ("pass", "fail", "n/a")
END_MARKER = "VRANGE-GUEST-END rc="
IMAGE_FORMAT = 1  # bump when the image's layout changes, to rebuild cached images
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
STDLIB_LEFT_OUT = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
                   "dist-packages", "__phello__", "pydoc_data"}


class Skipped(Exception):
    """This kernel cannot run here; the message says why."""


class BootFailed(Exception):
    """The kernel booted (or tried to) but gave no results; the message says why."""


class EarlyPanic(BootFailed):
    """The kernel panicked before /init ran: worth one more boot (emulation races, seen once)."""


# --- results: JSON Lines in, merged rows and a table out -----------------------------------------------


def parse_rows(text: str) -> list[dict[str, str]]:
    """Rows from the matrix's JSON Lines (blank lines ignored); also reads the older single
    document of `compat/run.py --json` (adapter: SKIP becomes n/a, the reason says why)."""
    stripped = text.strip()
    if stripped.startswith("{") and "\n" in stripped:
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError:
            document = None
        if isinstance(document, dict) and "profiles" in document:
            return rows_from_document(document)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number} is not JSON ({error}): {line[:200]!r}") from None
        if not isinstance(row, dict) or not {"scenario", "backend", "profile", "result"} <= row.keys():
            raise ValueError(f"line {number} is not a matrix cell: {line[:200]!r}")
        if "profiles" in row:
            return rows_from_document(row)
        rows.append(row)
    return rows


def rows_from_document(document: dict) -> list[dict[str, str]]:
    """Adapter for `compat/run.py --json` (one document, profiles -> scenarios -> backends)."""
    rows = []
    for profile in document["profiles"]:
        for scenario, row in profile.get("cells", {}).items():
            for backend, cell in row.items():
                status = cell["status"].lower()
                rows.append({"scenario": scenario, "backend": backend, "profile": profile["profile"],
                             "kernel": document.get("kernel", ""),
                             "result": "n/a" if status == "skip" else status,
                             "reason": cell.get("reason", "")})
    return rows


def merge(columns: Iterable[tuple[str, list[dict[str, str]]]]) -> list[dict[str, str]]:
    """One list of rows, each naming the kernel it ran on (the column's label wins over what the
    row says: a column is where it ran)."""
    return [{**row, "kernel": label, "reason": row.get("reason") or ""}
            for label, rows in columns for row in rows]


def format_table(rows: list[dict[str, str]], kernels: Sequence[str] | None = None) -> str:
    """Rows scenario/backend/profile, one column per kernel; reasons as numbered notes; a `*`
    marks a row whose result differs between kernels; totals per kernel last."""
    kernels = list(kernels or dict.fromkeys(row["kernel"] for row in rows))
    keys = list(dict.fromkeys((row["scenario"], row["backend"], row["profile"]) for row in rows))
    cells = {(row["scenario"], row["backend"], row["profile"], row["kernel"]): row for row in rows}
    notes: dict[str, int] = {}
    table = []
    for key in keys:
        results = []
        for kernel in kernels:
            row = cells.get((*key, kernel))
            if row is None:
                results.append(("-", ""))
                continue
            text = row["result"]
            if row.get("reason"):
                text += f" [{notes.setdefault(row['reason'], len(notes) + 1)}]"
            results.append((text, row["result"]))
        differs = len({result for _, result in results}) > 1
        table.append([*key, *(text for text, _ in results), "*" if differs else ""])
    header = ["scenario", "backend", "profile", *kernels, ""]
    widths = [max(len(line[column]) for line in [header, *table]) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip()
             for line in [header, *table]]
    lines.insert(1, "  ".join("-" * width for width in widths[:-1]))
    lines.append("")
    lines += [f"[{number}] {note}" for note, number in notes.items()]
    if any(line[-1] for line in table):
        lines.append("* the result differs between kernels")
    lines.append("")
    for kernel in kernels:
        counts = {result: 0 for result in RESULTS}
        for row in rows:
            if row["kernel"] == kernel:
                counts[row["result"]] = counts.get(row["result"], 0) + 1
        lines.append(f"{kernel}: " + ", ".join(f"{count} {result}" for result, count in counts.items()))
    return "\n".join(lines)


# --- kernels: Debian packages, cached ---------------------------------------------------------------------


@dataclasses.dataclass
class Kernel:
    package: str
    version: str
    release: str  # what uname -r says in the guest
    vmlinuz: Path
    config: dict[str, str]  # the CONFIG_ lines that matter to vrange


CONFIG_KEYS = re.compile(r"^(?:# )?(CONFIG_(?:USERFAULTFD|PTE_MARKER_UFFD_WP|HAVE_ARCH_USERFAULTFD_\w+|"
                         r"MEMCG|PSI|SECCOMP_FILTER|DEVTMPFS|MEMFD_CREATE|TRANSPARENT_HUGEPAGE))"
                         r"(?:=(\S+)| is not set)$")


def natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def package_pattern(spec: str) -> re.Pattern[str]:
    if spec.startswith("linux-image-"):
        return re.compile(re.escape(spec) + "$")
    return re.compile(rf"linux-image-{re.escape(spec)}[.-][0-9][^_\s]*-cloud-amd64$")


def resolve_package(spec: str, cache: Path) -> str:
    """The newest package apt knows for a kernel spec, else the newest cached one."""
    pattern = package_pattern(spec)
    names: list[str] = []
    if shutil.which("apt-cache"):
        listed = subprocess.run(["apt-cache", "pkgnames", "linux-image-"], capture_output=True,
                                text=True, check=False)
        names = [name for name in listed.stdout.split() if pattern.fullmatch(name)]
    if not names:
        names = [Path(deb).name.partition("_")[0] for deb in glob.glob(str(cache / "debs" / "*.deb"))]
        names = [name for name in names if pattern.fullmatch(name)]
    if not names:
        raise Skipped(f"no Debian package for kernel {spec!r}: apt knows none matching "
                      f"{pattern.pattern} (apt-get update?) and none is cached in {cache / 'debs'}")
    return max(names, key=natural_key)


def fetch_kernel(package: str, cache: Path) -> Kernel:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(glob.glob(str(debs / f"{glob.escape(package)}_*.deb")), key=natural_key)
    if not found:
        if not shutil.which("apt-get"):
            raise Skipped(f"{package} is not cached in {debs} and apt-get is missing")
        download = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                                   package], cwd=debs, capture_output=True, text=True, check=False)
        found = sorted(glob.glob(str(debs / f"{glob.escape(package)}_*.deb")), key=natural_key)
        if download.returncode != 0 or not found:
            raise Skipped(f"apt-get download {package} failed: {download.stderr.strip()[-300:]}")
    deb = Path(found[-1])
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    target = cache / "kernels" / f"{package}_{version}"
    if not (target / "vmlinuz").exists():
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            subprocess.run(["dpkg-deb", "-x", str(deb), scratch], check=True)
            images = glob.glob(os.path.join(scratch, "boot", "vmlinuz-*"))
            configs = glob.glob(os.path.join(scratch, "boot", "config-*"))
            if not images:
                raise Skipped(f"{deb.name} holds no /boot/vmlinuz-*")
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            shutil.copyfile(images[0], partial / "vmlinuz")
            if configs:
                shutil.copyfile(configs[0], partial / "config")
            (partial / "release").write_text(Path(images[0]).name.removeprefix("vmlinuz-"))
            partial.rename(target)
    config: dict[str, str] = {}
    if (target / "config").exists():
        for line in (target / "config").read_text().splitlines():
            match = CONFIG_KEYS.match(line)
            if match:
                config[match[1]] = match[2] or "n"
    return Kernel(package, version, (target / "release").read_text().strip(), target / "vmlinuz", config)


# --- the guest's userland: one initramfs ------------------------------------------------------------------

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "vrange-guest: no cgroup2"
export HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/lib64
echo "vrange-guest: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(grep MemTotal /proc/meminfo)"
ls -l /dev/userfaultfd 2>/dev/null || echo "vrange-guest: no /dev/userfaultfd"
cd /opt/vrange-compat
start=$(date +%s)
sh /vrange-run.sh >/tmp/stdout 2>/tmp/stderr
rc=$?
echo "vrange-guest: the command exited $rc after $(( $(date +%s) - start )) s; its standard error:"
tail -n 60 /tmp/stderr
stty -F /dev/ttyS1 raw -echo 2>/dev/null
{ cat /tmp/stdout; echo "VRANGE-GUEST-END rc=$rc"; } >/dev/ttyS1
sync
echo "vrange-guest: powering off"
poweroff -f
"""


def base_interpreter() -> str:
    """The interpreter the guest carries: the one beneath a virtual environment, if this runs in
    one (a venv's interpreter finds its standard library through the venv's files, which the
    image does not hold; vrange and its packages are installed into the image on their own)."""
    if sys.prefix != sys.base_prefix:
        return getattr(sys, "_base_executable", sys.executable)
    return sys.executable


def python_layout(python: str) -> dict[str, str]:
    script = ("import json, sys, sysconfig; print(json.dumps({'executable': sys.executable, "
              "'version': sys.version, 'stdlib': sysconfig.get_path('stdlib'), "
              "'platstdlib': sysconfig.get_path('platstdlib'), 'purelib': sysconfig.get_path('purelib')}))")
    return json.loads(subprocess.run([python, "-c", script], capture_output=True, text=True,
                                     check=True).stdout)


def image_key(python: dict[str, str], packages: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{IMAGE_FORMAT}\n{INIT}\n{python}\n{sorted(packages)}\n".encode())
    for path in (python["executable"], BUSYBOX):
        info = os.stat(path)
        digest.update(f"{os.path.realpath(path)} {info.st_size} {info.st_mtime_ns}\n".encode())
    sources = [REPO / "pyproject.toml", REPO / "setup.py"]
    for folder in ("src", "compat"):
        sources += sorted(path for path in (REPO / folder).rglob("*")
                          if path.is_file() and "__pycache__" not in path.parts
                          and not path.name.endswith((".so", ".o")))
    for path in sources:
        digest.update(f"{path.relative_to(REPO)}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _copy_tree(source: Path, target: Path, left_out: set[str]) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        ignored = {name for name in names if name in left_out or name.startswith("config-")
                   or name.endswith((".a", ".opt-1.pyc", ".opt-2.pyc"))}
        return ignored if Path(folder) == source else {
            name for name in names if name.endswith((".opt-1.pyc", ".opt-2.pyc"))}
    shutil.copytree(source, target, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _shared_libraries(paths: Iterable[Path]) -> set[str]:
    """Every library (and the loader) `ldd` names for these ELF files."""
    libraries: set[str] = set()
    for path in paths:
        listed = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in listed.stdout.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                libraries.add(match[1])
    return libraries


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"\x7fELF"


def build_image(python: dict[str, str], packages: Sequence[str], cache: Path,
                log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """The initramfs (gzip) for this interpreter and checkout, and the site-packages it holds
    (this machine's column runs the same build); cached by a hash of their inputs."""
    folder = cache / "images" / image_key(python, packages)
    image = folder / "initrd.gz"
    root = folder / "root"
    site = _inside(root, python["purelib"])
    if image.exists():
        return image, site
    log(f"building the guest image in {folder} ...")
    shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True)
    executable = Path(python["executable"])
    for path in (executable, Path(os.path.realpath(executable))):
        _inside(root, str(path)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(executable), _inside(root, str(path)))
    stdlibs = dict.fromkeys([python["stdlib"], python["platstdlib"]])
    for stdlib in stdlibs:
        _copy_tree(Path(stdlib), _inside(root, stdlib), STDLIB_LEFT_OUT)
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run([python["executable"], "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--root-user-action=ignore",
                    "--no-warn-script-location", "--target", str(site), str(REPO), *packages], check=True)
    shutil.copytree(REPO / "compat", root / "opt" / "vrange-compat" / "compat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elves = [executable] + [path for path in root.rglob("*.so*")
                            if path.is_file() and not path.is_symlink() and _is_elf(path)]
    for library in sorted(_shared_libraries(elves)):
        if library.startswith(str(root)):
            continue  # shipped already (numpy.libs and the like)
        target = _inside(root, library)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(library), target)
        target.chmod(0o755)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as partial:
        with gzip.GzipFile(fileobj=partial, mode="wb", compresslevel=6, mtime=0) as compressed:
            write_cpio(compressed, _tree_entries(root), devices=[("dev/console", 5, 1)])
    os.rename(partial.name, image)
    log(f"guest image: {image.stat().st_size >> 20} MiB compressed")
    return image, site


def _tree_entries(root: Path) -> list[tuple[str, Path]]:
    entries = []
    for folder, names, files in os.walk(root):
        names.sort()
        for name in [*names, *sorted(files)]:
            path = Path(folder) / name
            entries.append((str(path.relative_to(root)), path))
    return entries


def write_cpio(out, entries: Iterable[tuple[str, Path | bytes]],  # type: ignore[no-untyped-def]
               devices: Iterable[tuple[str, int, int]] = ()) -> None:
    """A newc cpio archive, everything owned by root, directories and executables readable by
    everyone (the unprivileged profile runs as uid 65534). An entry is a path on disk or bytes
    (a file made up on the spot)."""
    inode = 0

    def header(name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal inode
        inode += 1
        encoded = name.encode() + b"\0"
        fields = [inode, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % field for field in fields) + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))

    def data(content: bytes) -> None:
        out.write(content + b"\0" * (-len(content) % 4))

    directories: set[str] = set()
    for name, source in entries:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in directories:
                directories.add(parent)
                header(parent, stat.S_IFDIR | 0o755, 0)
        if isinstance(source, bytes):
            header(name, stat.S_IFREG | 0o755, len(source))
            data(source)
        elif source.is_symlink():
            target = os.readlink(source).encode()
            header(name, stat.S_IFLNK | 0o777, len(target))
            data(target)
        elif source.is_dir():
            if name not in directories:
                directories.add(name)
                header(name, stat.S_IFDIR | 0o755, 0)
        else:
            content = source.read_bytes()
            header(name, stat.S_IFREG | (0o755 if source.stat().st_mode & 0o111 else 0o644), len(content))
            data(content)
    for name, major, minor in devices:
        header(name, stat.S_IFCHR | 0o600, 0, (major, minor))
    header("TRAILER!!!", 0, 0)


# --- booting ---------------------------------------------------------------------------------------------


def missing_tools() -> str | None:
    if not shutil.which(QEMU):
        return f"{QEMU} not found (apt-get install qemu-system-x86, or run with --install)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} not found (apt-get install busybox-static, or run with --install)"
    with open(BUSYBOX, "rb") as file:
        if b"/lib64/ld-linux" in file.read(4096):
            return f"{BUSYBOX} is dynamically linked: the guest needs busybox-static"
    return None


def guest_command(python: dict[str, str], command: Sequence[str]) -> bytes:
    return f"exec {shlex.quote(python['executable'])} {shlex.join(command)}\n".encode()


def boot(kernel: Kernel, image: Path, command: bytes, args: argparse.Namespace,
         log: Callable[[str], None] = print) -> tuple[list[dict[str, str]], float]:
    """Boot the kernel with the image; the rows the guest printed and the seconds it took."""
    runs = args.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    console, results, initrd = (runs / (kernel.release + suffix)
                                for suffix in (".console.log", ".out", ".initrd"))
    with open(initrd, "wb") as out:  # the per-run command, then the cached image: the kernel unpacks
        write_cpio(out, [("vrange-run.sh", command)])  # concatenated archives in turn (the
        with open(image, "rb") as cached:  # uncompressed one first: its end is exact)
            shutil.copyfileobj(cached, out)
    for path in (console, results):
        path.unlink(missing_ok=True)
    qemu = [QEMU, "-accel", f"tcg,thread={args.tcg_thread}", "-cpu", "max", "-m", str(args.memory), "-smp", str(args.smp),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{console}", "-serial", f"file:{results}",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=on rdinit=/init"]
    log(f"booting {kernel.package} ({kernel.version}); console log: {console}")
    started = time.monotonic()
    try:
        completed = subprocess.run(qemu, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BootFailed(f"no power-off within {args.timeout} s (killed); see {console}") from None
    finally:
        initrd.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    if completed.returncode != 0:
        raise BootFailed(f"qemu exited {completed.returncode}: {completed.stderr.strip()[-500:]}")
    output = results.read_text(errors="replace").replace("\r", "") if results.exists() else ""
    body, marker, tail = output.partition(END_MARKER)
    if not marker:
        log_text = console.read_text(errors="replace") if console.exists() else ""
        if "Kernel panic" in log_text and "vrange-guest:" not in log_text:
            raise EarlyPanic(f"the kernel panicked at boot after {seconds:.0f} s; see {console}")
        raise BootFailed(f"the guest wrote no results in {seconds:.0f} s; see {console}")
    rc = tail.split()[0] if tail.split() else "?"
    try:
        rows = parse_rows(body)
    except ValueError as error:
        raise BootFailed(f"the guest command exited {rc} and printed no matrix ({error}); "
                         f"see {console}") from None
    if not rows:
        raise BootFailed(f"the guest command exited {rc} and printed no rows; see {console}")
    return rows, seconds


def run_here(site: Path, command: Sequence[str], timeout: float) -> list[dict[str, str]]:
    """This machine's column: the same command with the same build (the image's site-packages)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([base_interpreter(), *command], cwd=REPO, env=environment,
                               capture_output=True, text=True, timeout=timeout, check=False)
    if completed.returncode not in (0, 1):
        raise BootFailed(f"the matrix exited {completed.returncode} here: {completed.stderr[-500:]}")
    return parse_rows(completed.stdout)


def install_tools() -> None:
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86",
                    "busybox-static"], env=environment, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        passthrough = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [options] [-- matrix options]")
    parser.add_argument("--kernel", action="append", metavar="SPEC",
                        help="a kernel to boot: 6.1, 6.12 or a package name (repeatable; "
                             f"default: {' and '.join(DEFAULT_KERNELS)})")
    parser.add_argument("--json", action="store_true", help="print the merged JSON Lines, not a table")
    parser.add_argument("--output", type=Path, metavar="FILE", help="also write the merged JSON Lines here")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds one boot may take, run included (default %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="default %(default)s")
    parser.add_argument("--guest-command", default=DEFAULT_GUEST_COMMAND,
                        help="the python arguments that print the matrix (default %(default)r)")
    parser.add_argument("--guest-package", action="append", metavar="REQUIREMENT",
                        help="pip requirement installed in the guest beside vrange (repeatable; "
                             f"default: {', '.join(DEFAULT_GUEST_PACKAGES)})")
    parser.add_argument("--memory", type=int, default=2048, help="guest MiB (default %(default)s)")
    parser.add_argument("--smp", type=int, default=2, help="guest CPUs (default %(default)s)")
    parser.add_argument("--tcg-thread", choices=("single", "multi"), default="single",
                        help="qemu's TCG threading (default %(default)s: with multi, the 6.12 kernel "
                             "hit an int3 oops while patching its own code at boot)")
    parser.add_argument("--no-host", action="store_true", help="leave out this machine's column")
    parser.add_argument("--install", action="store_true",
                        help="apt-get install qemu-system-x86 and busybox-static first")
    args = parser.parse_args(argv)
    args.cache = args.cache.expanduser()
    kernels = args.kernel or list(DEFAULT_KERNELS)
    packages = DEFAULT_GUEST_PACKAGES if args.guest_package is None else args.guest_package
    command = [*shlex.split(args.guest_command), *passthrough]
    guest = command
    if args.guest_command == DEFAULT_GUEST_COMMAND and not any(
            option == "--timeout" or option.startswith("--timeout=") for option in passthrough):
        guest = [*command, "--timeout", str(GUEST_CELL_TIMEOUT_S)]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.install:
        install_tools()
    python = python_layout(base_interpreter())
    columns: list[tuple[str, list[dict[str, str]]]] = []
    skipped: list[str] = []
    broken = False
    missing = missing_tools()
    image = site = None
    if missing is None:
        args.cache.mkdir(parents=True, exist_ok=True)
        image, site = build_image(python, packages, args.cache, log)
    if not args.no_host:
        started = time.monotonic()
        columns.append((os.uname().release, run_here(site, command, args.timeout) if site else
                        parse_rows(subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True,
                                                  text=True, timeout=args.timeout, check=False).stdout)))
        log(f"{os.uname().release} (this machine): {time.monotonic() - started:.0f} s")
    for spec in kernels:
        try:
            if missing:
                raise Skipped(missing)
            kernel = fetch_kernel(resolve_package(spec, args.cache), args.cache)
            log(f"{kernel.package} {kernel.version}: " +
                ", ".join(f"{key}={value}" for key, value in kernel.config.items()))
            try:
                rows, seconds = boot(kernel, image, guest_command(python, guest), args, log)
            except EarlyPanic as panic:
                log(f"{panic}: booting once more")
                rows, seconds = boot(kernel, image, guest_command(python, guest), args, log)
            log(f"{kernel.release}: {len(rows)} cells in {seconds:.0f} s (boot, run and power-off)")
            columns.append((kernel.release, rows))
        except Skipped as reason:
            skipped.append(f"kernel {spec}: skipped: {reason}")
            log(skipped[-1])
        except BootFailed as reason:
            broken = True
            log(f"kernel {spec}: FAILED: {reason}")
    merged = merge(columns)
    lines = "".join(json.dumps(row) + "\n" for row in merged)
    if args.output:
        args.output.write_text(lines)
    if args.json:
        sys.stdout.write(lines)
    elif merged:
        print(format_table(merged, [label for label, _ in columns]))
    for line in skipped:
        print(line, file=sys.stderr if args.json else sys.stdout)
    if broken:
        return 2
    return 1 if any(row["result"] == "fail" for row in merged) else 0


if __name__ == "__main__":
    sys.exit(main())
