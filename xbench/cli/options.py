"""The command line's shared vocabulary: one builder per group of flags, used by every command.

A flag means the same thing in every command that takes it:

- model: ``--model NAME``, ``--weights FILE``, ``--checkpoint FILE``, ``--member NAME``,
  ``--device``, ``--dtype``, ``--engine`` (:func:`add_model_options`);
- data: ``--data``, ``--labels``, ``--boxes``, ``--limit`` (:func:`add_data_options`);
- explanation: ``--target`` (``predicted``, ``label`` or a class index), ``--layer`` (one
  value: ``last``, ``all``, ``NAME`` or ``NAME,NAME``; ``--layers`` is the same flag), ``--seed``
  (:func:`add_explanation_options`; :func:`add_layer_option` and :func:`add_seed_option` add
  one of them alone);
- plugins: ``-o/--option PLUGIN.KEY=VALUE`` (repeatable; a plugin option, never an output) and
  ``-p no:NAME`` (block a plugin; before or after the command) (:func:`add_plugin_options`);
- output: ``--output PATH``, the one name of every path a command writes
  (:func:`add_output_option`; an old spelling such as ``--out`` stays as a hidden alias that
  warns).

A plugin's command (``register_commands``) gets the same flags by calling these builders from
its ``configure(parser)`` (plugins may import this module besides ``xbench.__all__``), and
fits a flag's help, default or metavar to the command with :func:`adjust`;
:func:`plugin_option_values` converts its ``-o`` values with each plugin's declared types. This module imports neither torch nor the registry: building a parser
stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: the --dtype values (xbench.runner.DTYPES; a test keeps the two equal)
DTYPE_CHOICES = ("fp32", "bf16", "fp16")
#: the --engine values (xbench.engine.ENGINES; a test keeps the two equal)
ENGINE_CHOICES = ("auto", "eager", "onnxruntime", "compiled")
#: the --target rules; an integer is the third form, a fixed class index
TARGET_RULES = ("predicted", "label")


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs wrapped paragraph by paragraph, except lines that start with a
    blank (examples, lists), which stay as written; each argument's help ends with its default,
    unless the default is empty or the help already names it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines[1:]) or len(lines) == 1 and \
                    lines[0].startswith(" "):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(line.strip() for line in lines), width,
                                         initial_indent=indent, subsequent_indent=indent,
                                         break_on_hyphens=False))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default is True or default == [] \
            or default is argparse.SUPPRESS
        if "default" in text or empty or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class XbenchParser(argparse.ArgumentParser):
    """An ArgumentParser with the shared help format whose epilog may be a callable, called
    only when help is shown (listing the installed plugins imports them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def examples(*lines: str, note: str = "") -> str:
    """An epilog: 'examples:' then one command per line (then ``note``)."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return text + (f"\n\n{note}" if note else "")


def group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's argument group called ``title`` (made once)."""
    for existing in parser._action_groups:  # noqa: SLF001  (argparse keeps them there)
        if existing.title == title:
            return existing
    return parser.add_argument_group(title)


def _has(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions  # noqa: SLF001


def adjust(parser: argparse.ArgumentParser, flag: str, **changes: Any) -> argparse.Action:
    """Fit a built flag to one command: ``adjust(parser, "--limit", default=500, help=...)``
    sets those attributes (help, default, metavar, required, type, choices) of ``flag``."""
    if not _has(parser, flag):
        raise ValueError(f"{parser.prog} has no flag {flag}")
    action = parser._option_string_actions[flag]  # noqa: SLF001
    allowed = {"help", "default", "metavar", "required", "type", "choices"}
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise ValueError(f"adjust({flag}): cannot change {', '.join(unknown)}")
    for name, value in changes.items():
        setattr(action, name, value)
    return action


# ----------------------------------------------------------------------------------- values
def plugin_option(text: str) -> str:
    """``-o`` values: PLUGIN.KEY=VALUE (the value is converted later, by the plugin's types)."""
    head, sep, _ = text.partition("=")
    plugin, dot, key = head.partition(".")
    if not sep or not dot or not plugin or not key:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not PLUGIN.KEY=VALUE (e.g. rise.n_masks=500); -o is a plugin option "
            f"in every command, an output path is --output")
    return text


def target(text: str) -> str | int:
    """``--target``: 'predicted', 'label' or a class index (an integer >= 0)."""
    if text in TARGET_RULES:
        return text
    try:
        index = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose predicted, label or a class index (an integer >= 0)") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a class index is an integer >= 0")
    return index


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


class DeprecatedAlias(argparse.Action):
    """An old spelling kept working (hidden from help): stores into the new flag's ``dest``
    and says, on stderr, which flag replaces it."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str = "",
                 **kwargs: Any) -> None:
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class NoPluginOptions(argparse.Action):
    """``-o`` in a command that takes no plugin options: the same value check as everywhere,
    then an error saying so (instead of argparse's bare 'unrecognized arguments')."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"argument -o/--option: {parser.prog} takes no plugin options"
                     f" (-o is PLUGIN.KEY=VALUE in every command; an output path is --output)")


# --------------------------------------------------------------------------------- builders
def add_plugin_options(parser: argparse.ArgumentParser, *, takes_options: bool = True) -> Any:
    """``-o/--option PLUGIN.KEY=VALUE`` (repeatable, into ``args.options``) and ``-p no:NAME``.

    ``takes_options=False``: the command has no plugin options; ``-o`` is hidden and refused
    with a message that says so."""
    options = group(parser, "plugins")
    if takes_options and not _has(parser, "-o"):
        options.add_argument("-o", "--option", dest="options", action="append", default=[],
                             type=plugin_option, metavar="PLUGIN.KEY=VALUE",
                             help="a plugin option, repeatable; e.g. -o rise.n_masks=500 "
                                  "(xbench plugins NAME lists a plugin's options)")
    elif not _has(parser, "-o"):
        options.add_argument("-o", "--option", dest="options", action=NoPluginOptions,
                             type=plugin_option, help=argparse.SUPPRESS)
    add_block_option(parser)
    return options


def add_block_option(parser: argparse.ArgumentParser) -> None:
    """``-p no:NAME`` after the command (``xbench -p no:NAME COMMAND`` works too)."""
    if _has(parser, "-p"):
        return
    group(parser, "plugins").add_argument(
        "-p", dest="plugin_options_after", action="append", default=argparse.SUPPRESS,
        metavar="no:NAME", help="block the plugin NAME for this command (repeatable)")


def add_model_options(parser: argparse.ArgumentParser, *, weights: bool = True,
                      checkpoint: bool = True, member: bool = True, device: bool = True,
                      dtype: bool = True, engine: bool = True,
                      default_model: str | None = "efficientnet-lite0",
                      default_engine: str = "auto") -> Any:
    """The model group: ``--model`` (``default_model=None``: required) and, as asked,
    ``--weights``, ``--checkpoint``, ``--member``, ``--device``, ``--dtype``, ``--engine``."""
    model = group(parser, "model")
    model.add_argument("--model", default=default_model, required=default_model is None,
                       help="a registered model name (xbench plugins --kind model)")
    if weights:
        model.add_argument("--weights", metavar="FILE",
                           help="local weights file (state dict) for the model")
    if checkpoint:
        model.add_argument("--checkpoint", metavar="FILE",
                           help="checkpoint for the plugins that take one (L-CAM heads, "
                                "mutual-transfer models)")
    if member:
        model.add_argument("--member", metavar="NAME",
                           help="which member of a multi-network model (st1 or st2)")
    if device:
        model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    if dtype:
        model.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES,
                           help="fp32, or autocast bf16/fp16 for the explanations")
    if engine:
        model.add_argument("--engine", default=default_engine, choices=ENGINE_CHOICES,
                           help="how the hook-free forwards (Score-CAM, RISE, the metrics) run: "
                                "auto (onnxruntime for fp32 on CPU, else eager), eager, "
                                "onnxruntime or compiled (torch.compile)")
    return model


def add_data_options(parser: argparse.ArgumentParser, *, labels: bool = True,
                     boxes: bool = True, limit: bool = True,
                     default_data: str | None = "sample") -> Any:
    """The data group: ``--data`` (``default_data=None``: required) and, as asked,
    ``--labels``, ``--boxes``, ``--limit``."""
    data = group(parser, "data")
    data.add_argument("--data", default=default_data, required=default_data is None,
                      metavar="sample|FOLDER",
                      help="'sample' (the embedded photos) or an image folder (layouts: "
                           "docs/data.md)")
    if labels:
        data.add_argument("--labels", metavar="FILE",
                          help="labels: a file,label CSV, LOC_val_solution.csv or the devkit's "
                               "ground truth")
    if boxes:
        data.add_argument("--boxes", metavar="FILE|FOLDER",
                          help="object boxes: a file,width,height,x0,y0,x1,y1 CSV, "
                               "LOC_val_solution.csv or the ILSVRC2012_bbox_val_v3 folder "
                               "(default: found beside --data, e.g. FOLDER_boxes.csv)")
    if limit:
        data.add_argument("--limit", type=positive_int, metavar="N",
                          help="a seeded subset of N images (--seed)")
    return data


def add_explanation_options(parser: argparse.ArgumentParser, *, many_layers: bool = True,
                            default_target: str = "predicted", seed_help: str = "") -> Any:
    """The explanation group: ``--target``, ``--layer`` (alias ``--layers``) and ``--seed``.

    ``many_layers=False``: the command draws one layer (``last`` or one NAME)."""
    explanation = group(parser, "explanation")
    explanation.add_argument(
        "--target", type=target, default=default_target, metavar="predicted|label|N",
        help="the class explained: the top-1 prediction, the image's label, or class index N")
    add_layer_option(parser, many_layers=many_layers)
    add_seed_option(parser, seed_help or "seed for subsets, masks and bootstrap")
    return explanation


def add_layer_option(parser: argparse.ArgumentParser, *, many_layers: bool = True,
                     title: str = "explanation", default: str = "last", help: str = "") -> Any:
    """``--layer LAYER`` (``--layers`` is the same flag; into ``args.layers``): ``last`` (the
    model's default layer), one ``NAME`` and, with ``many_layers``, ``all`` or ``NAME,NAME``."""
    layers = ("last, all (one per block), NAME or NAME,NAME" if many_layers
              else "last or one NAME")
    return group(parser, title).add_argument(
        "--layer", "--layers", dest="layers", default=default, metavar="LAYER",
        help=help or f"target layer of CAM methods: {layers}; 'last' is the model's default "
                     f"layer")


def add_seed_option(parser: argparse.ArgumentParser, help: str = "",
                    title: str = "explanation") -> Any:
    """``--seed S`` (an integer >= 0)."""
    return group(parser, title).add_argument(
        "--seed", type=non_negative_int, default=0,
        help=help or "seed for subsets, masks and bootstrap")


def add_output_option(parser: argparse.ArgumentParser, help: str, *, default: str | None = None,
                      metavar: str = "PATH", old: Iterable[str] = (),
                      required: bool = False) -> Any:
    """``--output PATH``, the one flag of every path a command writes; ``old`` spellings stay
    as hidden aliases that warn. ``required``: ``--output`` (or an old spelling) must be given."""
    output = group(parser, "output")
    # a required flag and its aliases form one required choice, so that an old spelling
    # satisfies the requirement (argparse checks each required flag by itself otherwise)
    flags = output.add_mutually_exclusive_group(required=True) if required else output
    flags.add_argument("--output", default=default, metavar=metavar, help=help)
    for spelling in old:
        flags.add_argument(spelling, dest="output", action=DeprecatedAlias,
                           replacement="--output", help=argparse.SUPPRESS)
    return output


# ----------------------------------------------------------------------------------- values
def blocked_plugins(args: argparse.Namespace) -> list[str]:
    """The NAMEs of every ``-p no:NAME``, before and after the command."""
    from xbench.errors import UserError

    blocked = []
    for option in [*getattr(args, "plugin_options", []),
                   *getattr(args, "plugin_options_after", [])]:
        if not option.startswith("no:"):
            raise UserError(f"-p {option}: only '-p no:NAME' (block plugin NAME) is supported")
        blocked.append(option[3:])
    return blocked


def split_plugin_options(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """['rise.n_masks=500', ...] -> {'rise': {'n_masks': '500'}} (values still text)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, _, raw = plugin_option(item).partition("=")
        plugin, _, key = head.partition(".")
        out.setdefault(plugin, {})[key] = raw
    return out


def plugin_option_values(items: Iterable[str], classes: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """``-o`` values converted by each plugin's declared types: {plugin: {key: value}}.

    ``classes``: {name: class} of the plugins this command uses; an option of any other plugin,
    or an undeclared key, is a UserError naming ``-o``, the plugin and the option."""
    from xbench.errors import UserError, did_you_mean
    from xbench.options import OptionError

    out: dict[str, dict[str, Any]] = {}
    for plugin, values in split_plugin_options(items).items():
        if plugin not in classes:
            raise UserError(f"-o {plugin}.*: {plugin!r} is not a plugin this command uses "
                            f"({', '.join(classes)}).{did_you_mean(plugin, list(classes))}")
        for key, raw in values.items():
            try:
                out.setdefault(plugin, {})[key] = classes[plugin].parse_option(key, raw)
            except OptionError as exc:
                raise UserError(f"-o {plugin}.{key}={raw}: {exc}") from exc
    return out

