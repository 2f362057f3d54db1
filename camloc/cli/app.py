"""The `camloc` command line (typer). Commands parse options and call the library; no math here."""
from __future__ import annotations

from enum import Enum

import typer
import typer.core

import camloc.cli.common  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
from camloc import __version__

class PanelCommand(typer.core.TyperCommand):
    """A command whose plain-text help lists its options in sections by their help panel (each method's own
    options under "Method options: <methods>"), without rich (help texts stay as written, and fast)."""

    def format_options(self, ctx, formatter) -> None:
        arguments, panels = [], {"Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        for title, records in panels.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


class _Typer(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", PanelCommand)
        return super().command(*args, **kwargs)


app = _Typer(
    name="camloc",
    help="Where is CLIP looking? Localization maps of 25 methods (CAMs, RISE, LeGrad, AttnLRP, the dense family) on "
         "OpenAI, open_clip and Hugging Face CLIP models, scored as boxes, masks, points, segmentation, faithfulness "
         "and sanity checks from one engine; your own methods, data and models as plug-ins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[eval] table", "[default: ...]" must show as written
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"camloc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Where is CLIP looking? Localization maps of CLIP models, scored under every protocol of the field."""


class Listable(str, Enum):
    models = "models"
    methods = "methods"
    datasets = "datasets"


@app.command("list")
def list_cmd(
    what: Listable = typer.Argument(..., help="models, methods or datasets"),
    pattern: str = typer.Argument("*", help="models: a glob on the name, e.g. 'ViT-B-16*'."),
    backend: str = typer.Option("openai", "--backend", help="models: openai (the clip package) or open_clip (its pretrained pairs)."),
    plugin: list[str] = typer.Option([], "--plugin", help="methods: a plug-in to load first (a .py file or a module name); repeatable."),
) -> None:
    """List the models, methods or datasets camloc knows."""
    from camloc.cli.common import reports_errors

    reports_errors(_list)(what, pattern, backend, plugin)


def _list(what: "Listable", pattern: str, backend: str, plugin: list[str] | None = None) -> None:
    from fnmatch import fnmatch

    from camloc.errors import OptionError

    if what is Listable.models and backend == "open_clip":
        from camloc.models.open_clip_backend import TINY_CONFIGS, list_pretrained

        for arch, tag in list_pretrained(pattern):
            typer.echo(f"open_clip:{arch}:{tag}")
        for arch in TINY_CONFIGS:
            if fnmatch(arch, pattern):
                typer.echo(f"open_clip:{arch}:random")
    elif what is Listable.models:
        from camloc.models.specs import ALL_SPECS

        if backend != "openai":
            raise OptionError(f"--backend {backend!r} is not one of openai, open_clip")
        for name, spec in ALL_SPECS.items():
            if not fnmatch(name, pattern):
                continue
            kind = "official (download)" if spec.official else f"random init, seed {spec.seed}"
            typer.echo(f"{name:22s} {spec.family:4s} input {spec.input_size:4d}  {kind}")
    elif what is Listable.methods:
        from camloc.cams.registry import METHODS, list_methods
        from camloc.plugins import load_plugins

        load_plugins(plugin)
        for name in list_methods():
            spec = METHODS[name]
            families = "all" if len(spec.families) == 5 else ",".join(sorted(spec.families))
            needs = f" (needs {spec.needs}; not in --method all)" if spec.needs else ""
            origin = spec.origin
            source = "" if origin is None else (
                f" [plug-in: {origin.get('distribution') or origin.get('file') or origin['module']}]")
            typer.echo(f"{name:14s} {families:20s} {spec.description}{needs}{source}")
        typer.echo("families: rn (ModifiedResNet), vit (class-token ViT), vit-avg, timm-vit (SigLIP, EVA02, PE-Core "
                   "trunks), convnext. On convnext the head average-pools the target, so the gradients are spatially "
                   "uniform and GradCAM++, XGradCAM and LayerCAM reduce to CAM-style channel weightings.")
    else:
        from camloc.datasets import DATASETS, list_datasets
        from camloc.datasets.segmentation import SEG_DATASETS

        for name in list_datasets():
            typer.echo(f"{name:22s} {DATASETS[name].description}")
        for name, spec in SEG_DATASETS.items():
            typer.echo(f"{name:22s} {spec.description} (segmentation: --protocols ovseg)")


from camloc.cli import data as _data_cmd  # noqa: E402,F401  (registers `data`)
from camloc.cli import eval as _eval_cmd  # noqa: E402,F401  (registers `eval`)
from camloc.cli import explain as _explain_cmd  # noqa: E402,F401  (registers `explain`)
from camloc.cli import report as _report_cmd  # noqa: E402,F401  (registers `report`)
from camloc.cli import reproduce as _reproduce_cmd  # noqa: E402,F401  (registers `reproduce`)
from camloc.cli import rescore as _rescore_cmd  # noqa: E402,F401  (registers `rescore`)
from camloc.cli import sanity as _sanity_cmd  # noqa: E402,F401  (registers `sanity`)
from camloc.cli import search as _search_cmd  # noqa: E402,F401  (registers `threshold-search`)


def main() -> None:
    app()
