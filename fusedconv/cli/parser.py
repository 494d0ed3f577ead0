"""The `fusedconv` command's argument parser and entry point: `demo`, `convert`, `bench`."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from fusedconv.cli.bench_handoff import cmd_bench
from fusedconv.cli.convert_command import cmd_convert
from fusedconv.cli.demo import cmd_demo
from fusedconv.cli.status import EXIT_CHECK_FAILED, EXIT_USAGE, CLIError, first_line
from fusedconv.model_specs import ModelSpecError

SPEC_HELP = """\
model specs:
  torchvision:NAME      a torchvision.models builder, e.g. torchvision:resnet50 (weights=None)
  timm:NAME             a timm model, e.g. timm:repvgg_a0 (pretrained=False)
  smp:ARCH:ENCODER      a segmentation_models_pytorch model, e.g. smp:Unet:resnet34 (encoder_weights=None)
  FILE                  a pickled nn.Module (.pt/.pth), loaded only with --trust-pickle because unpickling
                        runs code from the file.
  Nothing is downloaded: models are built with random weights; pass trained ones with --weights FILE
  (a state_dict, loaded with torch.load(weights_only=True)).

  FILE.pt2              a torch.export ExportedProgram: its aten conv -> batch_norm (-> act) (-> add -> act)
                        chains are fused at the graph level (fusedconv.graph.exported); output .pt2 or .onnx.
  FILE (TorchScript)    a torch.jit.save file: converted to an ExportedProgram (example input from
                        --input-size, default 2,3,224,224), then fused the same way; output .pt2 or .onnx.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedconv", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fuse Conv -> BatchNorm -> activation (+ residual) chains of CNNs into one op.",
        epilog=SPEC_HELP)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="{demo,convert,bench}")

    demo = sub.add_parser("demo", help="convert a model and show the report, the error and the speed-up",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SPEC_HELP,
                          description="Build a model (default torchvision resnet50, random weights, no download), "
                                      "convert it, print the report, fused count, max error vs the original and "
                                      "latency before/after on the best available device.")
    demo.add_argument("--model", default="torchvision:resnet50", metavar="SPEC", help="model spec (see below)")
    demo.add_argument("--weights", metavar="FILE", help="state_dict to load instead of random weights")
    demo.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    demo.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    demo.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    demo.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, "
                                                   "float32 on CPU)")
    demo.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per model (default 2)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the input and BN statistics")
    demo.add_argument("--freeze", action="store_true",
                      help="convert with freeze=True (a FrozenModel: per-forward checks only outside the model; "
                           "later edits of the model are not seen) and time that")
    demo.set_defaults(func=cmd_demo)

    conv = sub.add_parser("convert", help="convert a model and save it as .pt, .pt2 or .onnx",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SPEC_HELP + """
outputs (by extension):
  .pt    the fused state_dict + the spec to rebuild it: fusedconv.cli.load_converted(path) returns the module
         (needs the same library that built it: torchvision / timm / smp)
  .pt2   torch.export ExportedProgram of the converted model for --input-size (torch.export.load)
  .onnx  ONNX export of the converted model for --input-size (runs in onnxruntime)
""", description="Convert a model and save the result.")
    conv.add_argument("spec", metavar="SPEC", help="model spec (see below)")
    conv.add_argument("-o", "--output", required=True, metavar="OUT", help="output file: .pt, .pt2 or .onnx")
    conv.add_argument("--weights", metavar="FILE", help="state_dict to load into the model before converting")
    conv.add_argument("--check", action="store_true", help="compare the converted model with the original "
                                                           "(and the ONNX file in onnxruntime); exit 1 on failure")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow SPEC to be a pickled nn.Module file (unpickling runs code from the file)")
    conv.add_argument("--input-size", metavar="N,C,H,W", help="example input shape for export and the check "
                                                              "(default: the model's, else 1,3,224,224)")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="run the benchmark suite (from a source checkout)", add_help=False,
                           description="Runs `python -m bench` with the remaining arguments (try --help).")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `bench` belongs to the suite's own parser (including --help).
    if "bench" in argv:
        i = argv.index("bench")
        if all(a.startswith("-") for a in argv[:i]):
            args = parser.parse_args(argv[:i + 1])
            args.bench_args = argv[i + 1:]
        else:
            args = parser.parse_args(argv)
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if not args.debug:
        warnings.filterwarnings("ignore")
        # torch.utils.benchmark imports cpp_extension, which logs a CUDA_HOME notice on machines without CUDA.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (CLIError, ModelSpecError) as e:
        print(f"fusedconv: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fusedconv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected still gets one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"fusedconv: error: {args.command}: {type(e).__name__}: {first_line(e)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_CHECK_FAILED if args.command == "bench" else EXIT_USAGE

