"""`bvit-sweep data ...`: prepare FFCV data sets and check prepared ones (thin; the work is in bvit's data).

A missing, damaged or unreadable source or prepared file is bad input: exit 2 with one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from orchestrator.cli.app import command, data_app, prepare_app

Out = Annotated[Path, typer.Option("--out", help="output directory (created if absent)")]
Force = Annotated[bool, typer.Option("--force", help="rewrite even when the output is up to date")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def _report(meta: dict[str, Any], out: Path) -> None:
    if meta["status"] == "up-to-date":
        typer.echo(f"{out}: up to date, nothing to do (use --force to rewrite)")
    else:
        typer.echo(f"{out}: wrote train.beton, test.beton, meta.json ({meta['reason']})")
    typer.echo(f"  {meta['train_count']:,} train / {meta['test_count']:,} test items, {meta['num_classes']} classes, "
               f"image shape {meta['image_shape']}, mean {meta['mean']}, std {meta['std']} (pixel units)")
    skipped = meta.get("skipped") or []
    if skipped:
        typer.echo(f"  skipped {len(skipped)} unreadable file(s) (listed in {out / 'meta.json'}):")
        for item in skipped[:10]:
            typer.echo(f"    {item['path']}: {item['reason']}")
        if len(skipped) > 10:
            typer.echo(f"    ... and {len(skipped) - 10} more")


@command(prepare_app, name="fashion-mnist")
def fashion_mnist(
        out: Out,
        source: Annotated[Path | None, typer.Option(
            help="directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
                 "(default: the Debian package dataset-fashion-mnist)")] = None,
        force: Force = False,
        quiet: Quiet = False,
) -> None:
    """Fashion-MNIST from its IDX files (60,000 train / 10,000 test, 28x28 grey, 10 classes).

    Example: `bvit-sweep data prepare fashion-mnist --out data/fashion-mnist`
    """
    from bvit.data.fashion_mnist import prepare_fashion_mnist

    meta = prepare_fashion_mnist(out=out, source=source, progress=not quiet, force=force)
    _report(meta, out)


@command(prepare_app, name="image-folder")
def image_folder(
        src: Annotated[Path, typer.Option("--src", help="directory with train/<class>/* and val/<class>/*")],
        out: Out,
        max_res: Annotated[int | None, typer.Option(help="shrink images so the longer side is at most N px")] = None,
        jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality of stored images")] = 90,
        raw: Annotated[bool, typer.Option("--raw", help="store raw pixels (lossless, larger) instead of JPEG")] = False,
        workers: Annotated[int | None, typer.Option(min=1, help="decoding processes (default: all cores)")] = None,
        strict: Annotated[bool, typer.Option(
            "--strict", help="stop at the first unreadable file instead of skipping and reporting it")] = False,
        force: Force = False,
        quiet: Quiet = False,
) -> None:
    """Class-folder images (ImageNet layout); unreadable files are skipped and reported (or, --strict, fatal).

    Example: `bvit-sweep data prepare image-folder --src /data/imagenet --out /data/imagenet-ffcv --max-res 256`
    """
    from bvit.data.image_folder import prepare_image_folder

    meta = prepare_image_folder(src=src, out=out, max_res=max_res, jpeg_quality=None if raw else jpeg_quality,
                                workers=workers, progress=not quiet, strict=strict, force=force)
    _report(meta, out)


@command(data_app, name="verify")
def verify(
        path: Annotated[Path, typer.Argument(help="a prepared directory")],
        as_json: Annotated[bool, typer.Option("--json", help="print meta.json")] = False,
) -> None:
    """Check a prepared directory's files against its meta.json (sizes, item counts, checksums).

    Example: `bvit-sweep data verify data/fashion-mnist`
    """
    from bvit.data.format import load_metadata

    meta = load_metadata(path)
    if as_json:
        typer.echo(json.dumps(meta, indent=1))
    else:
        typer.echo(f"{path}: ok -- {meta['dataset']}, {meta['train_count']:,} train / {meta['test_count']:,} test, "
                   f"{meta['num_classes']} classes, image shape {meta['image_shape']}")


@command(data_app, name="transfer")
def transfer(
        task: Annotated[Literal["fmnist-a", "fmnist-b", "digits"], typer.Argument(
            show_default=False, help="fmnist-a / fmnist-b: Fashion-MNIST classes 0-4 / 5-9; digits: scikit-learn "
                                     "8x8 digits upsampled to 28x28.")],
        out: Annotated[Path, typer.Option("--out", show_default=False, help="Output directory.")],
        force: Annotated[bool, typer.Option("--force", help="Rewrite even when up to date.")] = False,
) -> None:
    """A downstream (transfer) task as a prepared data directory.

    Example: `bvit-sweep data transfer fmnist-b --out data/fmnist-b`
    """
    from bvit.data.downstream import prepare_task

    meta = prepare_task(task, out=out, force=force)
    typer.echo(f"{out}: {meta['status']}; {meta['train_count']:,} train / {meta['test_count']:,} test, "
               f"{meta['num_classes']} classes ({', '.join(meta['class_names'])})")
