"""Typed params: params.yaml validated at load into one pydantic model per section (the sections:
lmforge/core/data_params.py and lmforge/core/model_params.py; their base and the read trace:
lmforge/core/section.py).

An unknown key or a bad value is an `LmforgeError` naming the key and what is allowed. What loading
accepts is bounded (file size, values once YAML aliases are expanded, nesting) and a message quotes
at most the start of a value: a hostile or broken file costs a second, never a hung stage.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmforge.core.data_params import (  # noqa: F401  (re-exported: `from lmforge.core.params import CleanParams`)
    MAX_SEQ_LEN, CleanParams, DataParams, EngineParams, HfSourceParams, MixParams, SourceParams, TasksParams,
    TokenizerParams,
)
from lmforge.core.errors import LmforgeError
from lmforge.core.presets import PRESETS
from lmforge.core.timings import phase
from lmforge.core.model_params import (  # noqa: F401  (re-exported)
    CLASSIFY_METRICS, LOWER_IS_BETTER, SFT_METRICS, EvaluateParams, EvaluateRuntime, FinetuneParams, GenerateParams,
    LoraParams, ModelParams, PretrainParams, PretrainRuntime, PromoteMetricParams, PromoteParams, RuntimeParams,
    TrainerParams, TrainingKnobs, TrainingRuntime,
)
from lmforge.core.section import SECTION_KEYS, TRACE_ENV, Section, start_trace, untraced, write_trace  # noqa: F401

DEFAULT_PARAMS_PATH = Path("params.yaml")
# params.yaml is a few KB: a file of a megabyte is not one (and is never read whole).
MAX_PARAMS_BYTES = 1_000_000
# Values (scalars, lists, mappings) the file may hold once its YAML aliases are expanded; the
# repository's holds ~200. A "billion laughs" file of 10 lines expands to 9**9 values, which
# validation (and its messages) would walk for hours while the loaded objects stay small.
MAX_PARAMS_VALUES = 100_000
# Characters of a value, and errors, that a message quotes at most.
MAX_QUOTED_CHARS = 100
MAX_LISTED_ERRORS = 10


class Params(BaseModel):
    """params.yaml: every knob of the pipeline, one section per stage, validated at load by
    lmforge/core/params.py (an unknown key or a bad value stops the stage with a message naming the key).

    This file is generated from the typed params, their defaults and descriptions
    (`python -m lmforge.core.params_yaml > params.yaml`): change a default or a comment in
    lmforge/core/data_params.py or model_params.py, then regenerate. An empty value is null.
    Experiment from the command line: dvc exp run -S tokenizer.vocab_size=8192"""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    data: DataParams = Field(DataParams(), description="stage ingest: where documents come from")
    engine: EngineParams = Field(EngineParams(), description="where the data stages compute (run-time: tracked by no stage)")
    clean: CleanParams = Field(CleanParams(), description="stage clean: quality filters and dedup")
    tokenizer: TokenizerParams = Field(TokenizerParams(), description="stage tokenize: the BPE and the shards")
    mix: MixParams = Field(MixParams(), description="stage tokenize: each named source's share of training tokens")
    model: ModelParams = Field(ModelParams(), description="the decoder's shape")
    pretrain: PretrainParams = Field(PretrainParams(), description="stage pretrain: the training knobs")
    finetune: FinetuneParams = Field(FinetuneParams(), description="stage finetune: task, data, method, training knobs")
    generate: GenerateParams = Field(GenerateParams(), description="stage evaluate: sampling of the pretrained model's samples")
    tasks: TasksParams = Field(TasksParams(), description="stage finetune_data: the built-in fine-tuning tasks")
    evaluate: EvaluateParams = Field(EvaluateParams(), description="stage evaluate: how much data each figure uses")
    promote: PromoteParams = Field(PromoteParams(), description="stage promote: when the challenger becomes champion")
    runtime: RuntimeParams = Field(RuntimeParams(), description="how stages run, never what they compute (tracked by no stage)")

    def trainer(self, stage: Literal["pretrain", "finetune"]) -> TrainerParams:
        """What the trainer reads for `stage`: its section's training knobs and `runtime.<stage>`."""
        knobs, runtime = getattr(self, stage), getattr(self.runtime, stage)
        return TrainerParams(**{name: getattr(knobs, name) for name in TrainingKnobs.model_fields},
                             **{name: getattr(runtime, name) for name in TrainingRuntime.model_fields})

    @model_validator(mode="after")
    def _fits_the_context(self) -> Params:
        """Checks across sections that would otherwise fail only after training: everything the
        model reads or writes must fit its context, tokenizer.seq_len."""
        context = self.tokenizer.seq_len
        for key, new_tokens in (("generate.max_new_tokens", self.generate.max_new_tokens),
                                ("evaluate.sft_max_new_tokens", self.evaluate.sft_max_new_tokens)):
            if new_tokens >= context:
                raise ValueError(f"{key} {new_tokens} leaves no room for a prompt in the model's context "
                                 f"(tokenizer.seq_len {context}): lower it below {context}")
        self._tensor_parallel_divides()
        limit = context + (1 if self.finetune.task == "sft" else 0)  # sft rows hold inputs + 1 shifted target
        if self.finetune.max_length > limit:
            raise ValueError(f"finetune.max_length {self.finetune.max_length} exceeds what the model reads "
                             f"({limit} tokens for {self.finetune.task}, from tokenizer.seq_len): lower it")
        step = self.finetune.micro_batch_size * self.finetune.grad_accum_steps
        sizes = self.evaluate.label_efficiency_sizes
        if self.evaluate.label_efficiency and sizes[0] < step:
            raise ValueError(f"evaluate.label_efficiency_sizes {sizes[0]} is fewer examples than one fine-tuning step "
                             f"takes ({step}: finetune.micro_batch_size x grad_accum_steps): raise it to {step} or more")
        return self

    @model_validator(mode="after")
    def _weights_name_the_sources(self) -> Params:
        """mix.weights (tokenize's) and data.sources (ingest's) name the same sources."""
        weights, data = self.mix.weights, self.data
        if data.source != "sources":
            if weights:
                raise ValueError(f"mix.weights {sorted(weights)} weighs named sources, but data.source is "
                                 f"{data.source!r}: set data.source: sources and list them in data.sources, or "
                                 "empty mix.weights")
            return self
        names = data.source_names
        missing = [name for name in names if name not in weights]
        unknown = [name for name in weights if name not in names]
        if missing:
            raise ValueError(f"mix.weights has no weight for data.sources {missing}: give every source a weight")
        if unknown:
            raise ValueError(f"mix.weights names {unknown}, which data.sources does not list (it has {names})")
        return self

    def _tensor_parallel_divides(self) -> None:
        """pretrain.tensor_parallel N splits the heads and the processes N ways: checked at load,
        before any work (lmforge.train.distributed checks the world size torchrun gives again)."""
        n = self.pretrain.tensor_parallel
        if n == 1:
            return
        preset = PRESETS[self.model.preset]
        n_heads = self.model.n_heads or preset["n_heads"]
        counts = {"runtime.pretrain.nproc": self.runtime.pretrain.nproc, "n_heads": n_heads,
                  "n_kv_heads": self.model.n_kv_heads or preset.get("n_kv_heads") or n_heads}
        for key, count in counts.items():
            if count % n:
                raise ValueError(f"pretrain.tensor_parallel {n} does not divide {key} {count} (model preset "
                                 f"{self.model.preset!r}): pick a tensor_parallel that divides nproc and the heads")


def _section_keys(model: type[BaseModel], prefix: str = "") -> dict[type[BaseModel], str]:
    """Each section class -> its dotted place in params.yaml (every class sits in one place)."""
    keys: dict[type[BaseModel], str] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            assert annotation not in keys, f"{annotation.__name__} sits in two places of params.yaml"
            keys[annotation] = f"{prefix}{name}"
            keys |= _section_keys(annotation, f"{prefix}{name}.")
    return keys


SECTION_KEYS.update(_section_keys(Params))


def _format_error(error: dict[str, Any], model: type[BaseModel]) -> str:
    key = ".".join(_short(str(part)) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return f"unknown key '{key}'" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    # A validator's own message may quote the value (e.g. `unknown preset ...`).
    message = _short(error["msg"].removeprefix("Value error, "), 2 * MAX_QUOTED_CHARS)
    if not key:  # a check across sections: its message names the keys
        return message
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {_QUOTE.repr(got)})"
    return f"{key}: {message}{got_text}"


def _short(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


# repr of a value, bounded whatever its size (reprlib cuts strings, lists and nesting before repr).
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict = 2, 5, 5, 4
_QUOTE.maxstring = _QUOTE.maxlong = _QUOTE.maxother = MAX_QUOTED_CHARS


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; errors name every bad key at once (the first MAX_LISTED_ERRORS)."""
    try:
        with untraced():
            return Params.model_validate(raw or {})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        lines = [_format_error(err, Params) for err in errors[:MAX_LISTED_ERRORS]]
        if len(errors) > MAX_LISTED_ERRORS:
            lines.append(f"... and {len(errors) - MAX_LISTED_ERRORS:,} more")
        if len(lines) == 1:  # the common case reads as one line
            raise LmforgeError(f"{source} is invalid: {lines[0]}") from None
        raise LmforgeError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml (DVC edits this file for `dvc exp run -S`). With TRACE_ENV set,
    the keys the process reads from here on are recorded (write_trace appends them)."""
    start_trace()
    path = Path(path)
    with phase("params"):
        raw = read_params_yaml(path)
        if raw is not None and not isinstance(raw, dict):
            raise LmforgeError(f"{path} must be a mapping of sections (data, clean, tokenizer, ...)")
        return parse_params(raw, str(path))


def read_params_yaml(path: Path) -> Any:
    """The YAML document in `path`, bounded: at most MAX_PARAMS_BYTES, and MAX_PARAMS_VALUES once
    its aliases are expanded (counted on the composed nodes, before anything is built from them);
    otherwise one LmforgeError naming the file. Also for the flow, before DVC reads the file."""
    if not path.is_file():
        raise LmforgeError(f"{path} not found: run from the repository root, where params.yaml lives")
    with path.open("rb") as file:
        data = file.read(MAX_PARAMS_BYTES + 1)
    if len(data) > MAX_PARAMS_BYTES:
        raise LmforgeError(f"{path} is larger than {MAX_PARAMS_BYTES:,} bytes, not a params file (they are a few "
                           "KB): check that it is the file you meant")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not UTF-8 text (byte {exc.start:,}): save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if not _within_values(node, MAX_PARAMS_VALUES):
            raise LmforgeError(
                f"{path} holds more than {MAX_PARAMS_VALUES:,} values once its YAML aliases (*name) are expanded, "
                "or an alias inside itself: a params file holds a few hundred; write the values out instead")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise LmforgeError(f"{path} is not valid YAML: {_short(str(exc), 3 * MAX_QUOTED_CHARS)}") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively
        raise LmforgeError(f"{path} nests lists or mappings too deeply to be params: fix its brackets") from None
    finally:
        loader.dispose()


def _within_values(root: yaml.Node, limit: int) -> bool:
    """Whether `root` holds at most `limit` values with every alias expanded (a node an alias shares
    counts each time it appears), and no alias inside itself (an endless expansion). A walk over
    the distinct nodes, each one's expanded size remembered: as fast as the file is small."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            ancestors.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > limit:
                return False
        elif id(node) in ancestors:
            return False
        elif id(node) not in sizes:
            ancestors.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    return True


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
