#!/usr/bin/env python
"""Export a model to ONNX, a torch.export program (.pt2) or TorchScript, then check the file against eager.

    python scripts/export.py --model pce_resnet18.fmnist --format onnx --output pce_resnet18.onnx --dynamic-batch
    python scripts/export.py --model runs/demo/pce --format exported-program --output model.pt2
    python scripts/export.py --model pce_resnet18 --format torchscript --output model.pt --img-size 224

--model takes a registry name (a pretrained tag loads its weights; a bare name exports the untrained
architecture), a run / model / checkpoint folder, local-dir:DIR or hf-hub:ID. The file is reloaded (ONNX: in
onnxruntime) and run at the example's batch size (with --dynamic-batch also at 1 and larger ones) on random
inputs; a table gives the max abs difference from the eager model, the file size and the time per image eager vs
exported. A difference above --atol is an error (exit 1) and leaves no file; the file appears only complete.
ONNX needs the onnx extra: pip install 'pce_timm[onnx]'.
"""
import argparse
import sys

# pce_timm.export's FORMATS and ONNX_EXPORTERS (tests/test_export.py checks they agree), written out so that
# --help imports no torch
FORMATS = ('onnx', 'exported-program', 'torchscript')
ONNX_EXPORTERS = ('dynamo', 'torchscript')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--model', required=True, help='registry name, run / model / checkpoint folder, local-dir:, '
                                                       'hf-hub:')
    parser.add_argument('--format', required=True, choices=FORMATS)
    parser.add_argument('--output', required=True, help='the file to write')
    parser.add_argument('--img-size', type=int, default=None, help="height = width; None: the model's input size")
    parser.add_argument('--batch-size', type=int, default=2, help='batch size of the example input')
    parser.add_argument('--dynamic-batch', action='store_true', help='export the batch dimension as dynamic')
    parser.add_argument('--onnx-exporter', default='dynamo', choices=ONNX_EXPORTERS,
                        help='torch.onnx.export(dynamo=True) or the TorchScript-based exporter')
    parser.add_argument('--eval-capacity-factor', type=float, default=None,
                        help="set on every top-k PCE layer: training's slots instead of a slot per patch at every "
                             'expert (cheaper graph; predictions depend on the batch)')
    parser.add_argument('--atol', type=float, default=1e-4, help='largest max abs difference from eager accepted')
    parser.add_argument('--no-progress', action='store_true')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # before the imports below (torch): --help is instant
    from pce_timm.export import ExportError, MissingExtraError
    from pce_timm.train.cli import run_cli

    def run():
        import timm

        from pce_timm.export import export_model, load_source_model, set_eval_capacity_factor

        model = load_source_model(args.model)
        set_eval_capacity_factor(model, args.eval_capacity_factor)
        input_size = tuple(timm.data.resolve_model_data_config(model)['input_size'])
        if args.img_size is not None:
            input_size = (input_size[0], args.img_size, args.img_size)
        report = export_model(model, args.format, args.output, input_size, args.batch_size, args.dynamic_batch,
                              args.onnx_exporter, args.atol, progress=not args.no_progress)
        print(report.table())
        print(f'\nwrote {report.path} (input {list(input_size)}, batch '
              f'{"dynamic" if args.dynamic_batch else args.batch_size}, export took {report.export_seconds:.1f} s)')

    return run_cli(run, extra_errors=(((ExportError, MissingExtraError), 1),))


if __name__ == '__main__':
    sys.exit(main())
