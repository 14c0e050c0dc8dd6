"""The peak memory of a benchmark's child process, read from its own VmHWM at exit (wait4's
ru_maxrss would include the parent's resident size, which Linux carries across fork and exec)."""

from __future__ import annotations

from pathlib import Path


def peak_script(peak: Path, body: str) -> str:
    """A `python -c` script running `body` that writes its peak RSS in KiB to `peak` at exit."""
    return (
        "import atexit, re, runpy, sys\n"
        "def _peak():\n"
        "    kb = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        f"    open({str(peak)!r}, 'w').write(kb)\n"
        "atexit.register(_peak)\n" + body
    )


def run_module_script(peak: Path, module: str, prog: str) -> str:
    """peak_script running `module` as __main__ (with the arguments after the script)."""
    return peak_script(
        peak, f"sys.argv[0] = {prog!r}\nrunpy.run_module({module!r}, run_name='__main__')\n"
    )


def peak_mib(peak: Path) -> float:
    return int(peak.read_text()) / 1024
