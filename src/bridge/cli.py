"""The ``bridge`` command line: parses arguments, calls the Python API, formats errors.

No logic lives here that a notebook user could not reach through :mod:`bridge.api`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from bridge.errors import BridgeError

app = typer.Typer(
    name="bridge",
    help="Budget-aware distillation: buy a few teacher rationales, let a local teacher assistant write the rest, train a tiny student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
data_app = typer.Typer(help="List and inspect data sets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="YAML configuration file; the embedded default (quick PubMedQA run) when omitted."),
]
OverridesOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting, such as --set budget.fraction=0.1 (repeatable)."),
]

_state = {"debug": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show info logs.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _overrides(values: list[str] | None) -> list[str]:
    return list(values or [])


@config_app.command("show")
def config_show(config: ConfigArg = None, overrides: OverridesOpt = None) -> None:
    """Print the resolved configuration with every default filled in."""
    from bridge.config import dump_config, load_config

    typer.echo(dump_config(load_config(config, _overrides(overrides))), nl=False)


@data_app.command("list")
def data_list(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder holding the data set folders; $BRIDGE_DATA_DIR when omitted.")
    ] = None,
) -> None:
    """List the data sets with their format, files and split sizes."""
    from bridge import api
    from bridge.data.inspection import format_listing

    typer.echo(format_listing(api.list_data(str(data_dir) if data_dir else None)), nl=False)


@data_app.command("inspect")
def data_inspect(
    name: Annotated[str, typer.Argument(help="Data set name, as 'bridge data list' shows it.")],
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Local model folder whose tokenizer measures lengths in tokens.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a data setting, such as --set train_size=100 (repeatable)."),
    ] = None,
) -> None:
    """Print split sizes, label distribution, length statistics and two examples of a data set."""
    from bridge import api
    from bridge.data import format_inspection

    typer.echo(format_inspection(api.inspect_data(name, tokenizer=tokenizer, overrides=_overrides(overrides))), nl=False)


YesOpt = Annotated[
    bool, typer.Option("--yes", "-y", help="Confirm sending data to a teacher endpoint that is not on this machine.")
]


def _print_summaries(summaries: dict) -> None:
    for stage, summary in summaries.items():
        if summary.get("skipped"):
            typer.echo(f"{stage:>14}: current, skipped")
        else:
            typer.echo(f"{stage:>14}: done in {summary.get('seconds', 0):.0f} s")


@app.command("run")
def run(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="First stage to rerun (select, teach, train-ta, tutor, train-student, eval, report).")] = None,
    until_stage: Annotated[str | None, typer.Option("--until", help="Last stage to run.")] = None,
    yes: YesOpt = False,
) -> None:
    """Run the whole pipeline: select, teach, train-ta, tutor, train-student, eval, report."""
    from bridge import api

    cfg = api.load_config(config, _overrides(overrides))
    summaries = api.run(cfg, from_stage=from_stage, until_stage=until_stage, yes=yes)
    _print_summaries(summaries)
    report = summaries.get("report", {})
    if report.get("report_html"):
        typer.echo(f"report: {report['report_html']}")


@app.command("compare")
def compare(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", min=1, help="Seeds per method; compare.seeds (3) when omitted.")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods: bridge, direct_same_budget, direct_full, label_only, bridge_no_stage_a, "
            "bridge_random; compare.methods (all) when omitted.",
        ),
    ] = None,
    yes: YesOpt = False,
) -> None:
    """Run BRIDGE and its baselines side by side over several seeds; rerun the same command to resume."""
    from bridge import api
    from bridge.compare import REPORT_DIR, compare_root, format_table

    cfg = api.load_config(config, _overrides(overrides))
    names = [name.strip() for name in methods.split(",") if name.strip()] if methods else None
    state = api.compare(cfg, seeds=seeds, methods=names, yes=yes)
    typer.echo(format_table(state))
    typer.echo(f"report: {compare_root(cfg) / REPORT_DIR / 'comparison.html'}")


@app.command("tune-selection")
def tune_selection(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    lambdas: Annotated[
        str, typer.Option("--lambdas", help="Comma-separated lambda values for phase 1, each between 0 and 1.")
    ] = "0,0.5,1",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per grid cell.")] = 2,
    student_data: Annotated[
        str,
        typer.Option(
            "--student-data",
            help="Stage B data: teacher_rationales (bought rationales only, cheap) or rationales (with TA "
            "apprenticeship and tutoring).",
        ),
    ] = "teacher_rationales",
    yes: YesOpt = False,
) -> None:
    """Choose lambda and the embedding by the dev accuracy of a Stage B student; rerun to resume."""
    from bridge import api
    from bridge.tuning import TABLE_FILE, format_protocol, selection_root

    cfg = api.load_config(config, _overrides(overrides))
    try:
        values = [float(value) for value in lambdas.split(",") if value.strip()]
    except ValueError:
        from bridge.errors import ConfigError

        raise ConfigError(
            f"--lambdas {lambdas!r} is not a comma-separated list of numbers", hint="such as --lambdas 0,0.5,1"
        ) from None
    state = api.tune_selection(cfg, lambdas=values, seeds=seeds, student_data=student_data, yes=yes)
    typer.echo(format_protocol(state))
    typer.echo(f"table: {selection_root(cfg, student_data) / TABLE_FILE}")


def _stage_command(command: str, doc: str) -> None:
    def command_function(config: ConfigArg = None, overrides: OverridesOpt = None, yes: YesOpt = False) -> None:
        from bridge import api

        summary = api.run_stage(api.load_config(config, _overrides(overrides)), command, yes=yes)
        _print_summaries({command: summary})

    command_function.__doc__ = doc
    app.command(command)(command_function)


for _name, _doc in (
    ("select", "Phase 1: score the training pool with the untuned TA and select the subset to buy."),
    ("teach", "Buy teacher rationales for the selected subset, within the budget."),
    ("train-ta", "Fine-tune the TA on the teacher's rationales (apprenticeship)."),
    ("tutor", "Have the refined TA write rationales for the whole training pool."),
    ("train-student", "Train the student through the configured curriculum stages."),
    ("eval", "Evaluate the TA and the student stages on the test split."),
    ("report", "Write report.md, report.html, plots and the model card."),
):
    _stage_command(_name, _doc)


@app.command("merge")
def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="LoRA adapter folder written by fine-tuning (its 'adapter' folder).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the merged Hugging Face model; must be new or an earlier merge.")],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model reference; by default the base recorded in the adapter folder."),
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base model; checks that weights changed and logits match."""
    import json

    from bridge import api
    from bridge.models.merge import MERGE_FILE

    path = api.merge(adapter_dir, out_dir, base=base)
    report = json.loads((path / MERGE_FILE).read_text(encoding="utf-8"))
    typer.echo(
        f"merged model written to {path} ({report['changed_tensors']} tensors changed, "
        f"maximum logit difference {report['max_logit_diff']:.2g})"
    )


@app.command("estimate")
def estimate(
    config: ConfigArg = None,
    overrides: OverridesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Estimate the teacher's calls, tokens and cost and check the budget, without any network call."""
    import json

    from bridge import api
    from bridge.teacher.estimate import estimate_dict, format_estimate

    result = api.estimate(api.load_config(config, _overrides(overrides)))
    typer.echo(json.dumps(estimate_dict(result), indent=2) if as_json else format_estimate(result))


@app.command("ledger")
def ledger(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holding ledger.sqlite) or the ledger file itself.")],
) -> None:
    """Show a run's teacher spending: spent, reserved, cached, failed and retried, by status and model."""
    from bridge import api
    from bridge.teacher.ledger import format_ledger_summary

    typer.echo(format_ledger_summary(api.ledger(run_dir)))


@app.command("serve")
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="Model to serve: a local Hugging Face folder, packaged:smollm2-135m-instruct, or a run directory "
            "(its trained student, else its refined TA)."
        ),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback exposes the model.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = 8000,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="Model id that requests must name; MODEL as given when omitted.")
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", min=1, help="Largest max_tokens a request may set, in tokens.")
    ] = 1024,
    max_request_bytes: Annotated[
        int, typer.Option("--max-request-bytes", min=1, help="Largest request body, in bytes.")
    ] = 1_048_576,
) -> None:
    """Serve a local model over an OpenAI-compatible API (chat completions, completions with logprobs)."""
    from bridge import api
    from bridge.serve import is_loopback

    if not is_loopback(host):
        typer.secho(f"warning: --host {host} is not a loopback address; the server has no authentication", err=True)
    api.serve(
        model,
        host=host,
        port=port,
        model_name=model_name,
        max_tokens_limit=max_tokens_limit,
        max_request_bytes=max_request_bytes,
        on_ready=lambda url: typer.echo(f"serving {model_name or model} at {url} (Ctrl-C stops)"),
    )
    typer.echo("server stopped")


@app.command("predict")
def predict(
    model: Annotated[str, typer.Argument(help="Model reference, or a run directory (its trained student, else its refined TA).")],
    source: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="Data file (.jsonl, .json, .csv, .tsv) described by the configuration's data.format and data.fields, "
            "or DATASET:SPLIT such as pubmedqa_pqal:test.",
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="YAML configuration; the run's own when MODEL is a run directory, else the embedded default."
        ),
    ] = None,
    overrides: OverridesOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="JSONL file for the predictions; <FILE stem>.<mode>.jsonl when omitted.")
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="generation (rationale and answer line) or scoring (option log-probabilities).")
    ] = "generation",
) -> None:
    """Predict every example of a data file with a model and print accuracy with its 95% Wilson interval."""
    from bridge import api

    settings = api.prediction_config(model, config, _overrides(overrides))
    if out is None:
        stem = Path(source).stem if Path(source).is_file() else source.replace(":", "_").replace("/", "_")
        out = Path(f"{stem}.{mode}.jsonl")
    result = api.predict(model, source, settings, out=out, mode=mode)
    scores = result["scores"]
    typer.echo(
        f"accuracy {scores.accuracy:.3f} (95% Wilson interval {scores.ci_low:.3f}-{scores.ci_high:.3f}), "
        f"{scores.correct}/{scores.n} correct; unparsable {scores.unparsable}, "
        f"hit the token limit {scores.truncated}"
    )
    typer.echo(f"predictions written to {result['out']}")


def main() -> None:
    """Entry point of the ``bridge`` command: user errors print one message and exit with 2."""
    try:
        app(standalone_mode=False)
    except BridgeError as exc:
        if _state["debug"]:
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished work is saved; rerun the same command to resume", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
