"""The `fusedconv` command line: `fusedconv demo`, `fusedconv convert SPEC -o OUT`, `fusedconv bench`.

Model specs name a model without downloading anything: `torchvision:NAME`, `timm:NAME`, `smp:ARCH:ENCODER`
(random weights unless `--weights` gives a state_dict), or a file (see `fusedconv.model_specs`). Converted `.pt`
files hold the fused state_dict plus the spec that rebuilds the architecture; `load_converted(path)` turns one
back into a module.

Errors are reported as one line on stderr and a non-zero exit status (`--debug` shows the traceback).

    parser.py           arguments and the entry point `main`
    demo.py, latency.py `fusedconv demo` and how it times the two models
    convert_command.py  `fusedconv convert`: convert, write .pt / .pt2 / .onnx, --check
    saved_model.py      the .pt format: save_converted / load_converted
    bench_handoff.py    `fusedconv bench`: the source checkout's benchmark suite, looked up at run time
    console.py, status.py  output, exit codes, the one-line user error
"""

from fusedconv.cli.parser import build_parser, main
from fusedconv.cli.saved_model import CONVERTED_VERSION, load_converted, save_converted
from fusedconv.cli.status import CHECK_TOLERANCE, EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, CLIError
from fusedconv.cli.convert_command import export_onnx, parse_input_size

__all__ = ["CHECK_TOLERANCE", "CLIError", "CONVERTED_VERSION", "EXIT_CHECK_FAILED", "EXIT_OK", "EXIT_USAGE",
           "build_parser", "export_onnx", "load_converted", "main", "parse_input_size", "save_converted"]
