"""`bvit-sweep data ...`: prepare FFCV data sets and check prepared ones (thin; the work is in bvit.data)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bvit.data.fashion_mnist import prepare_fashion_mnist
from bvit.data.format import DataError, load_metadata
from bvit.data.image_folder import prepare_image_folder

app = typer.Typer(help="Prepare and check FFCV data sets.", no_args_is_help=True, add_completion=False)
prepare_app = typer.Typer(help="Write train.beton, test.beton and meta.json into --out.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")

Out = Annotated[Path, typer.Option("--out", help="output directory (created if absent)")]
Force = Annotated[bool, typer.Option("--force", help="rewrite even when the output is up to date")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def _fail(e: DataError) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


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


@prepare_app.command("fashion-mnist")
def fashion_mnist(
        out: Out,
        source: Annotated[Path | None, typer.Option(
            help="directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
                 "(default: the Debian package dataset-fashion-mnist)")] = None,
        force: Force = False,
        quiet: Quiet = False,
) -> None:
    """Fashion-MNIST from its IDX files (60,000 train / 10,000 test, 28x28 grey, 10 classes)."""
    try:
        meta = prepare_fashion_mnist(out=out, source=source, progress=not quiet, force=force)
    except DataError as e:
        raise _fail(e) from None
    _report(meta, out)


@prepare_app.command("image-folder")
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
    """Class-folder images (ImageNet layout); unreadable files are skipped and reported (or, --strict, fatal)."""
    try:
        meta = prepare_image_folder(src=src, out=out, max_res=max_res, jpeg_quality=None if raw else jpeg_quality,
                                    workers=workers, progress=not quiet, strict=strict, force=force)
    except DataError as e:
        raise _fail(e) from None
    _report(meta, out)


@app.command("verify")
def verify(
        path: Annotated[Path, typer.Argument(help="a prepared directory")],
        as_json: Annotated[bool, typer.Option("--json", help="print meta.json")] = False,
) -> None:
    """Check a prepared directory's files against its meta.json (sizes, item counts, checksums)."""
    try:
        meta = load_metadata(path)
    except DataError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(meta, indent=1))
    else:
        typer.echo(f"{path}: ok -- {meta['dataset']}, {meta['train_count']:,} train / {meta['test_count']:,} test, "
                   f"{meta['num_classes']} classes, image shape {meta['image_shape']}")
