"""Which project files a script's run passes through: every function of the repository called
while ``main(parse_args(argv))`` runs, grouped by file (``sys.setprofile``).

    python bench/code_path.py transform -- --data_filepath data/pbmc68k_reduced.h5ad \
        --output_dir /tmp/code_path --overwrite

Prints the number of files and, per file, how many distinct functions were called in it. Run it
with each checkout's Python path (``PYTHONPATH=<checkout>``) to compare two versions.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections import defaultdict
from pathlib import Path

# The checkout measured is the one on PYTHONPATH (or the current folder), not necessarily this one.
sys.path.insert(0, "")
sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import bench_parser  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    own, script_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = bench_parser(__doc__)
    p.add_argument("script", help="the script's module name, e.g. transform or eval.reconstruction")
    args = p.parse_args(own)
    module = importlib.import_module(args.script)
    root = Path(module.__file__).resolve().parent
    while not (root / "utils").is_dir():
        root = root.parent
    called: dict[str, set[str]] = defaultdict(set)

    def profile(frame, event, _arg):
        if event == "call" and frame.f_code.co_name != "<module>":  # not imports done on the way
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(root) and "bench" not in path.parts and ".venv" not in path.parts:
                called[str(path.relative_to(root))].add(frame.f_code.co_qualname)

    parsed = module.parse_args(script_argv)
    threading.setprofile(profile)  # the transform's worker threads too
    sys.setprofile(profile)
    try:
        module.main(parsed)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    print(f"{len(called)} files, {sum(map(len, called.values()))} functions")
    for path in sorted(called):
        print(f"  {path}: {len(called[path])}")


if __name__ == "__main__":
    main()
