"""The verb that hands a patch to other runtimes: export (GGUF for llama.cpp and Ollama)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from safetypatch.api.export import ExportConfig
from safetypatch.cli._app import console, key_value_table, out
from safetypatch.cli._options import config_verb, flag


@config_verb(ExportConfig, flags={"patches": flag("--patch", "-p"), "output": flag("--output", "-o")})
def export(cfg: ExportConfig) -> None:
    """Turn safety patches into GGUF files llama.cpp and Ollama load: a LoRA adapter and/or a merged model."""
    from safetypatch import api

    console.print(f"[bold]safetypatch export[/] {len(cfg.patches)} patch(es) as {cfg.format} -> {cfg.output}")
    with console.status("checking the base GGUF and writing the files..."):
        result = api.export(cfg)
    out.print(_exported_table(result))
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.adapter is not None:
        console.print(f"llama.cpp: llama-cli -m {result.base} --lora {result.adapter}", soft_wrap=True)
    if result.merged is not None:
        console.print(f"llama.cpp: llama-cli -m {result.merged}", soft_wrap=True)
    console.print(f"Ollama: cd {result.output} && ollama create NAME -f Modelfile."
                  f"{'adapter' if result.adapter is not None else 'merged'}", soft_wrap=True)
    console.print(f"[green]done[/] in {result.seconds:.1f} s: {result.output}")


def _exported_table(result: Any) -> Table:
    """The summary of ``safetypatch export``: the base and how it was matched, and each file written."""
    checks = {"gguf_sha256": "the patch base's own file (sha256)", "fingerprint": "the patch base (fingerprint)",
              "other base": "another model (accepted with --allow-other-base)",
              "unchecked": "unchecked (the patch records no base)"}
    record = result.record
    rows = {"patches": ", ".join(Path(p["path"]).name for p in record["patches"]),
            "modules": f"{record['modules']} (rank {record['rank']})", "base": str(result.base),
            "base is": checks[result.base_check]}
    for item in result.exports:
        error = f", off W0 + ΔW by {item.update_error:.2%} of ΔW" if item.update_error is not None else ""
        rows[item.kind] = f"{result.output / item.path.name} ({item.file_type}{error})"
    return key_value_table("exported", rows)
