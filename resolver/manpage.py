"""Manual pages from the argument parsers, so `man` and `--help` cannot say different things.

`python -m resolver.manpage DIR` writes DIR/ipseckey-resolver.8, DIR/autosp.8 and
DIR/ipseckey-resolver.toml.5 (`make install` runs it). Every page is built from the parser
objects the programs use for --help: descriptions, options with their metavars and help, each
autosp subcommand with its own, and the epilogs (configuration keys, exit statuses, examples)
as preformatted text. The configuration page is the daemon's --help epilog (its
"configuration file" part), which lists every table and key with its default.

Why not the `argparse-manpage` package: it needs the same parser objects, renders subcommands
less completely than the few lines below, and would be one more build dependency.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Final

VERSION: Final = "0.1.0"
MANUAL: Final = "ipseckey-resolver manual"
SEE_ALSO: Final = ("ipseckey-resolver(8)", "autosp(8)", "ipseckey-resolver.toml(5)",
                   "systemd.service(5)", "swanctl(8)", "unbound(8)")


def escape(text: str) -> str:
    """Text as roff reads it literally: backslashes, hyphens, and control characters at the
    start of a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.split("\n")]
    return "\n".join(lines)


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if para:
            out += [".PP", escape(para)]
    return out


def _preformatted(text: str) -> list[str]:
    return [".PP", ".nf", ".RS 4", *(escape(ln) if ln.strip() else "" for ln in
                                     text.rstrip().split("\n")), ".RE", ".fi"]


def _option_lines(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:  # argparse has no public view of its actions
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            takes = action.nargs != 0
            metavar = action.metavar or (action.dest.upper() if takes else "")
            if action.choices and takes and not action.metavar:
                metavar = "{" + ",".join(map(str, action.choices)) + "}"
            names = ", ".join(f"\\fB{escape(o)}\\fR" + (f" \\fI{escape(str(metavar))}\\fR"
                                                        if takes else "")
                              for o in action.option_strings)
        else:
            names = f"\\fI{escape(str(action.metavar or action.dest))}\\fR"
        helptext = action.help or ""
        if "%(default)" in helptext:
            helptext = helptext % {"default": action.default}
        out += [".TP", names, escape(" ".join(helptext.split()))]
    return out


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _head(name: str, section: int, summary: str) -> list[str]:
    date = datetime.date.fromtimestamp(_source_date()).isoformat()
    return [f'.TH "{name.upper()}" "{section}" "{date}" "{name} {VERSION}" "{MANUAL}"',
            ".SH NAME", f"{escape(name)} \\- {escape(summary)}"]


def _source_date() -> float:
    # Reproducible builds: SOURCE_DATE_EPOCH when the packager sets it.
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return float(value) if value.isdigit() else _mtime()


def _mtime() -> float:
    return max(p.stat().st_mtime for p in Path(__file__).parent.glob("*.py"))


def _see_also(self_ref: str) -> list[str]:
    refs = [r for r in SEE_ALSO if r != self_ref]
    return [".SH SEE ALSO", ",\n".join(f"\\fB{escape(r.split('(')[0])}\\fR({r.split('(')[1]}"
                                       for r in refs)]


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().replace("usage: ", "", 1).split())


def render_program(parser: argparse.ArgumentParser, section: int, summary: str,
                   config_note: str = "") -> str:
    """A program's page: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, COMMANDS, the epilog."""
    name = parser.prog
    out = _head(name, section, summary)
    out += [".SH SYNOPSIS", ".nf", escape(_usage(parser)), ".fi"]
    out += [".SH DESCRIPTION", *_paragraphs(parser.description or "")]
    if config_note:
        out += _paragraphs(config_note)
    out += [".SH OPTIONS", *_option_lines(parser)]
    subs = _subcommands(parser)
    if subs:
        out += [".SH COMMANDS"]
        for sub_name, sub in subs:
            out += [".SS " + escape(sub_name), ".nf", escape(_usage(sub)), ".fi",
                    *_paragraphs(sub.description or ""), *_option_lines(sub)]
            if sub.epilog and sub.epilog != parser.epilog:
                out += _preformatted(sub.epilog)
    if parser.epilog:
        out += [".SH NOTES", *_preformatted(parser.epilog)]
    out += _see_also(f"{name}({section})")
    return "\n".join(out) + "\n"


def config_section(epilog: str, marker: str = "configuration file") -> str:
    """The configuration part of the daemon's epilog: from `marker` to the exit statuses."""
    start = epilog.find(marker)
    text = epilog[start:] if start >= 0 else epilog
    end = text.find("\nexit status")
    return text if end < 0 else text[:end]


def render_config(parser: argparse.ArgumentParser, path: str) -> str:
    """ipseckey-resolver.toml(5): the file's tables and keys, as --help lists them."""
    name = "ipseckey-resolver.toml"
    out = _head(name, 5, "configuration of the ipseckey-resolver daemon")
    out += [".SH SYNOPSIS", escape(path)]
    out += [".SH DESCRIPTION", *_paragraphs(
        "A TOML file read at start-up by ipseckey-resolver(8) (--config FILE). Every table "
        "and key is optional; a missing key takes the default shown. An unknown table or "
        "key, or a value of the wrong type, stops the daemon with exit status 2 and a message "
        "naming the file, the table and the key. Check a file without starting the daemon "
        "with: ipseckey-resolver --config FILE --check-config.")]
    out += [".SH TABLES AND KEYS", *_preformatted(config_section(parser.epilog or ""))]
    out += _see_also(f"{name}(5)")
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """File name -> roff text for every page."""
    from autosp.cli import build_parser as autosp_parser
    from resolver.cli import build_parser as resolver_parser

    daemon = resolver_parser()
    config_path = "/etc/ipseckey-resolver/ipseckey-resolver.toml"
    return {
        "ipseckey-resolver.8": render_program(
            daemon, 8, "DNSSEC-validating resolver that brings IPsec tunnels up first",
            f"Installed as a service, it reads {config_path} (see ipseckey-resolver.toml(5)) "
            "and runs under systemd as ipseckey-resolver.service: `systemctl enable --now "
            "ipseckey-resolver`, logs in `journalctl -u ipseckey-resolver`, numbers with "
            "`autosp stats` or, with [metrics] listen, over HTTP in the Prometheus format."),
        "autosp.8": render_program(
            autosp_parser(), 8, "keep IPsec tunnels to endpoints by name; publish this "
            "host's key"),
        "ipseckey-resolver.toml.5": render_config(daemon, config_path),
    }


def write(directory: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Write the pages into `directory` (created if missing); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages().items():
        if names is None or name in names:
            path = directory / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m resolver.manpage DIRECTORY", file=sys.stderr)
        return 2
    for path in write(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
