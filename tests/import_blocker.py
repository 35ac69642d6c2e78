"""Run a command's real entry point in a subprocess whose import system refuses some packages: a meta-path finder
raising ModuleNotFoundError (what a missing package raises) for each named top-level package and its submodules.
How the tests check what a command does on an install without an extra (torch, FastAPI, highdicom)."""
import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import importlib, importlib.abc, sys
    blocked = sys.argv[1].split(",")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Block())
    mod, fn = sys.argv[2].split(":")
    sys.argv = [mod] + sys.argv[3:]
    getattr(importlib.import_module(mod), fn)()
""")
TIMEOUT_S = 120  # one CLI start in a fresh interpreter on a loaded 2-core machine, with margin


def run_blocked(modules: str, entry: str, *args: str) -> subprocess.CompletedProcess:
    """Run `entry` ("module:function") with `args` while the comma-separated `modules` cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK, modules, entry, *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
