"""``CellSentenceModel``: a ``train.py`` run or published C2S model that predicts, generates and embeds cells.

>>> model = CellSentenceModel.load("data/model/scratch-e2e-k50")  # doctest: +SKIP
>>> model.predict_cell_types(["CD3E CD3D IL7R ...", "LYZ CD14 S100A8 ..."])  # doctest: +SKIP
['CD4+/CD45RO+ Memory', 'CD14+ Monocyte']
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.cli import InputError
from utils.models.cell_inputs import as_sentences, read_train_record
from utils.models.examples import CONDITIONAL_GENERATION, UNCONDITIONAL_GENERATION
from utils.models.prompts import (
    DEFAULT_ORGANISM,
    PromptFormat,
    attribute_name,
    prompt_format,
    prompt_words,
)
from utils.models.recipe import DEFAULT_TOP_K_GENES, Recipe
from utils.publish import settle_inputs

logger = logging.getLogger("cell2sentence")

DEFAULT_LABEL_TOKENS = 32  # answer budget for a label when the model's labels are unknown
UNKNOWN_GENES_WARNING = 0.10  # share of a cell's top genes the model never saw that is worth a warning


@dataclass
class LabelPredictions:
    """One label column's predictions: label and probability per cell, cells x labels probabilities."""

    column: str
    labels: list[str]
    scores: np.ndarray
    probabilities: pd.DataFrame


@dataclass
class CellSentenceModel:
    """A model (eval mode), its tokenizer (left padding), prompt format, genes per prompt,
    ``train_args.json`` record ({} when published) and recipe."""

    model: Any
    tokenizer: Any
    prompt_format: PromptFormat
    top_k_genes: int = DEFAULT_TOP_K_GENES
    record: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    recipe: Recipe = field(default_factory=Recipe.for_published_model)

    @classmethod
    def load(cls, name_or_dir: str | Path, *, device: str = "auto", dtype: str = "auto",
             prompt_format_name: str | None = None, top_k_genes: int | None = None,
             organism: str = DEFAULT_ORGANISM) -> CellSentenceModel:
        """Load a model folder (run, LoRA run, merged, published) or hub name with its recipe;
        ``prompt_format_name`` and ``top_k_genes`` override the recipe's, with a warning."""
        from utils.models.generation import pick_device
        from utils.models.loading import load_model_and_tokenizer

        settle_inputs(Path(str(name_or_dir)).expanduser())  # a publish cut short there (or in its parent): finish it
        record = read_train_record(name_or_dir)
        recipe = Recipe.read(name_or_dir)
        if prompt_format_name and not recipe.published and prompt_format_name != recipe.prompt_format:
            logger.warning("Prompting in the %s format although %s was trained with %s prompts (--prompt_format).",
                           prompt_format_name, name_or_dir, recipe.prompt_format)
        if top_k_genes and not recipe.published and top_k_genes != recipe.top_k_genes:
            logger.warning("Using the top %d genes although %s was trained on the top %d.", top_k_genes,
                           name_or_dir, recipe.top_k_genes)
        fmt = prompt_format(prompt_format_name or recipe.prompt_format,
                            organism=organism if recipe.published else recipe.organism)
        dev, torch_dtype = pick_device(device, dtype)
        model, tokenizer = load_model_and_tokenizer(name_or_dir, dev, dtype=torch_dtype)
        logger.info("%s: %s.", name_or_dir, recipe.describe())
        return cls(model, tokenizer, fmt, top_k_genes or recipe.top_k_genes, record, str(name_or_dir), recipe)

    @property
    def context(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
                   or 1024)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options: Any) -> list[Any]:
        """``generation.generate_batched`` of the prompts, at most ``max_new_tokens`` new tokens that fit
        the model's context (a warning when fewer)."""
        from utils.models.generation import generate_batched

        new_tokens = min(max_new_tokens, max(1, self.context - max((len(p) for p in prompts), default=0)))
        if new_tokens < max_new_tokens:
            logger.warning("Generating at most %d new tokens (the model's context is %d).", new_tokens,
                           self.context)
        return generate_batched(self.model, prompts, pad_token_id=self.tokenizer.pad_token_id,
                                eos_token_id=self.tokenizer.eos_token_id, max_new_tokens=new_tokens, **options)

    def known_genes(self) -> list[str] | None:
        """The genes a word-level tokenizer of ``train.py`` spells (None for sub-word tokenizers)."""
        from utils.models.tokenizer import SPECIAL_TOKENS

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "WordLevel":
            return None
        labels = [x for column in self.recipe.label_columns.values() for x in column]
        columns = list(self.recipe.label_columns)
        attributes = [attribute_name(c) for c in columns] if columns[1:] else []
        other = set(SPECIAL_TOKENS) | set(prompt_words(labels, attributes=attributes,
                                                       max_number=max(1024, self.top_k_genes)))
        vocab = self.tokenizer.get_vocab()
        return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in other]

    def prediction_prompts(self, sentences: Sequence[str], *, budget: int, n_genes: int | None = None,
                           column: str | None = None) -> tuple[list[list[int]], int]:
        """Prompt ids per sentence (its first K genes, fewer where the context is short, with a warning) and
        how many were shortened; the prompts asking for ``column`` (default: the cell type)."""
        from utils.models.examples import encode_prompt
        from utils.models.generation import shorten_to_fit

        k = n_genes or self.top_k_genes
        fmt, tok = self.prompt_format, self.tokenizer
        attribute = self.recipe.attribute(column)
        prompts, shortened = [], 0
        for sentence in sentences:
            genes = sentence.split()[:k]
            ids, n = shorten_to_fit(
                lambda n, g=genes: encode_prompt(tok, fmt.prediction_prompt(g[:n], attribute=attribute), fmt),
                len(genes), self.context - budget)
            shortened += n < len(genes)
            prompts.append(ids)
        if shortened:
            logger.warning("%s prediction prompts were shortened to fit the model's %d-token context.",
                           f"{shortened:,}", self.context)
        return prompts, shortened

    def cell_sentences(self, cells: Any, *, n_genes: int | None = None) -> list[str]:
        """The first K genes of each cell's sentence, made as in training, unknown genes dropped (a
        warning above 10% of the top genes, an ``InputError`` when the model knows none)."""
        k = n_genes or self.top_k_genes
        # the genes the model was trained on: the recipe's, else a word-level tokenizer's (None: unknown)
        known = self.recipe.genes if self.recipe.genes is not None else self.known_genes() or None
        vocabulary = None if known is None else set(known)
        # Unknown genes are dropped before the cut to K, so an AnnData's sentences stay whole.
        full = as_sentences(cells, recipe=self.recipe, max_genes=None if vocabulary is not None else k)
        if vocabulary is None:
            return [" ".join(s.split()[:k]) for s in full]
        n_seen = n_unknown = 0
        kept = []
        for sentence in full:
            words = sentence.split()
            top = words[:k]
            n_seen += len(top)
            n_unknown += sum(w not in vocabulary for w in top)
            kept.append(" ".join([w for w in words if w in vocabulary][:k]))
        share = n_unknown / n_seen if n_seen else 0.0
        if n_seen and n_unknown == n_seen:
            raise InputError(f"None of the cells' top {k} genes is one {self.name} was trained on (its vocabulary "
                             f"has {len(vocabulary):,} genes, e.g. {', '.join(sorted(vocabulary)[:3])}); check that "
                             "the gene names are of the same kind (symbols, not Ensembl ids: --gene_column) and "
                             "organism.")
        level = logging.WARNING if share > UNKNOWN_GENES_WARNING else logging.INFO if n_unknown else logging.DEBUG
        logger.log(level, "%.1f%% of the cells' top %d genes are unknown to the model (left out of the sentences).",
                   100 * share, k)
        return kept

    def label_set(self, column: str | None = None) -> list[str]:
        """The labels the model was trained to predict for ``column`` (default: its first)."""
        return self.recipe.labels(column)

    def predict_cell_types(self, cells: Any, *, batch_size: int = 16, max_new_tokens: int | None = None,
                           labels: Iterable[str] | None = None, n_genes: int | None = None,
                           constrain: bool = True, return_scores: bool = False,
                           progress: Callable[[int], None] | None = None,
                           column: str | None = None) -> list[str] | LabelPredictions:
        """The predicted cell type (or label of ``column``) of each of ``cells`` (sentences, a dataset split or
        an AnnData): one of ``labels`` (default: the model's) by its normalized sequence probability, or with
        ``constrain=False`` greedy free text (NaN scores). ``return_scores``: a :class:`LabelPredictions`."""
        result = self.predict_sentences(self.cell_sentences(cells, n_genes=n_genes), batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, labels=labels, n_genes=n_genes,
                                        constrain=constrain, progress=progress, column=column)
        return result if return_scores else result.labels

    def predict_sentences(self, sentences: Sequence[str], *, batch_size: int = 16, max_new_tokens: int | None = None,
                          labels: Iterable[str] | None = None, n_genes: int | None = None, constrain: bool = True,
                          progress: Callable[[int], None] | None = None,
                          column: str | None = None) -> LabelPredictions:
        """:meth:`predict_cell_types` of sentences that :meth:`cell_sentences` already made."""
        from scipy.special import softmax

        from utils.models.constrain import label_sequences, score_labels
        from utils.models.examples import decode_answer, encode_answer

        n_genes = n_genes or self.top_k_genes
        known = self.recipe.label_columns
        if column is not None and known and column not in known:
            raise InputError(f"{self.name} was trained to predict {', '.join(known)}, not {column!r}.")
        label_set = (sorted(dict.fromkeys(str(x) for x in labels)) if labels is not None
                     else self.label_set(column))
        name = column or self.recipe.label_column or "cell_type"
        tok, fmt = self.tokenizer, self.prompt_format
        if not (constrain and label_set):
            if constrain:
                logger.warning("%s records no label set: answering in free text (pass labels=... to constrain).",
                               self.name)
            reference = label_set or self.label_set()  # a free-text label: the longest known label's tokens + 2
            budget = max_new_tokens or (max(len(encode_answer(tok, fmt.prediction_answer(x), fmt)) for x in reference)
                                        + 2 if reference else DEFAULT_LABEL_TOKENS)
            prompts, _ = self.prediction_prompts(sentences, budget=budget, n_genes=n_genes, column=name)
            answers = [decode_answer(tok, a, fmt) for a in
                       self.generate_ids(prompts, budget, batch_size=batch_size, do_sample=False, progress=progress)]
            return LabelPredictions(name, answers, np.full(len(answers), np.nan),
                                    pd.DataFrame(index=range(len(answers))))
        sequences = label_sequences(tok, label_set, fmt)
        seen: dict[tuple[int, ...], str] = {}
        for label, ids in zip(label_set, sequences, strict=True):
            if tuple(ids) in seen:
                raise InputError(f"The labels {seen[tuple(ids)]!r} and {label!r} have the same tokens for "
                                 f"{self.name}'s tokenizer; the model cannot tell them apart.")
            seen[tuple(ids)] = label
        prompts, _ = self.prediction_prompts(sentences, budget=max(len(x) for x in sequences), n_genes=n_genes,
                                             column=name)
        probabilities = softmax(score_labels(self.model, prompts, sequences, batch_size=batch_size,
                                             pad_token_id=tok.pad_token_id, progress=progress), axis=1)
        best = probabilities.argmax(axis=1)
        return LabelPredictions(name, [label_set[i] for i in best], probabilities[np.arange(len(best)), best],
                                pd.DataFrame(probabilities, columns=label_set))

    def gene_budget(self, n_genes: int, genes: Sequence[str] | None) -> int:
        """New tokens for ``n_genes`` genes: 1.25 x their mean token length (else 4) + 2."""
        per_gene = 4.0
        if genes:
            sample = list(genes)[:: max(1, len(genes) // 500)]
            # as a gene appears after the first in an answer, in any format: after one space
            per_gene = float(np.mean([len(self.tokenizer(" " + g, add_special_tokens=False)["input_ids"])
                                      for g in sample]))
        return int(np.ceil(1.25 * n_genes * per_gene)) + 2

    def gene_constraint(self, names: Sequence[str] | None) -> tuple[Callable[[], Any] | None, set[str]]:
        """A factory of the logits processor allowing the genes ``names`` (None when there are none) and
        the genes it allows."""
        from utils.models.constrain import GeneConstraint, build_gene_tries

        if not names:
            logger.warning("No gene list for this model's tokenizer: generating without the gene "
                           "constraint (pass genes=..., e.g. the transform's vocabulary).")
            return None, set()
        fmt = self.prompt_format
        first, rest, closing, kept = build_gene_tries(self.tokenizer, names, answer_prefix=fmt.answer_prefix,
                                                      answer_suffix=fmt.answer_suffix)
        if len(kept) < len(names):
            logger.info("The gene constraint covers %s of %s genes (the others the tokenizer cannot "
                        "spell, or spells like another).", f"{len(kept):,}", f"{len(names):,}")
        vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        return partial(GeneConstraint, first, rest, closing, vocab_size), set(kept)

    def _generation_prompt(self, requested: Any, n_genes: int) -> str:
        """The prompt of a label, None or conditions (the first label column alone: its prompt)."""
        fmt = self.prompt_format
        if isinstance(requested, tuple):
            if [c for c, _ in requested] == [self.recipe.label_column]:
                return fmt.generation_prompt(requested[0][1], n_genes)
            order = {c: i for i, c in enumerate(self.recipe.condition_columns)}  # training names them so
            return fmt.conditions_prompt(sorted(requested, key=lambda pair: order.get(pair[0], len(order))), n_genes)
        return fmt.generation_prompt(requested, n_genes)

    def _check_requested(self, requested: Sequence[Any]) -> None:
        """Refuse generation tasks, cell types or conditions (tuples) the model was not trained on."""
        recipe, tasks = self.recipe, ", ".join(self.recipe.tasks)
        conditioned = [t for t in requested if isinstance(t, tuple)]
        if conditioned and recipe.has_task(CONDITIONAL_GENERATION) is False:
            raise InputError(f"{self.name} was not trained to generate cells under conditions (its tasks: "
                             f"{tasks}); train with the conditional_generation task.")
        # one label column: conditions on it alone are its cell types
        allowed = recipe.condition_columns or [c for c in [recipe.label_column] if c]
        for conditions in dict.fromkeys(conditioned):
            for column, value in conditions:
                if column not in allowed:
                    raise InputError(
                        f"{self.name} was not trained to generate under conditions on {column!r} (it was on "
                        f"{', '.join(allowed) or 'the cell type alone'}); train with --label_columns naming "
                        "the columns and the conditional_generation task.")
                known = recipe.labels(column)
                if known and value not in known:
                    raise InputError(f"{self.name} was never trained on {column}={value!r}; it knows "
                                     f"{', '.join(map(repr, known))}.")
        if None in requested and recipe.has_task(UNCONDITIONAL_GENERATION) is False:
            raise InputError(f"{self.name} was not trained to generate cells of any type (its tasks: "
                             f"{tasks}); name the cell types to generate.")
        types = {t for t in requested if isinstance(t, str)}
        if types and recipe.has_task(CONDITIONAL_GENERATION) is False:
            raise InputError(f"{self.name} was not trained to generate cells of a given type (its tasks: "
                             f"{tasks}); ask for cells of any type (None).")
        known = set(recipe.labels())
        unknown = sorted(types - known) if known else []
        if unknown:
            raise InputError(f"{self.name} was never trained on the cell type(s) {', '.join(map(repr, unknown))}; "
                             f"it knows {', '.join(map(repr, sorted(known)))}.")

    def generate_cells(self, cell_types: Sequence[str] | Mapping[str, int], n_per_type: int = 1, *,
                       n_genes: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
                       temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                       constrain_genes: bool = True, genes: Iterable[str] | None = None,
                       seed: int | None = None, progress: Callable[[int], None] | None = None,
                       processes: Any = None) -> pd.DataFrame | None:
        """Sample ``n_per_type`` cells of each listed type, or ``{type: count}``. A type is a label, None
        (any type) or conditions, ``{"cell_type": "B cell", "tissue": "blood"}`` (as a count key: its
        ``tuple(items())``). With ``constrain_genes`` every word is a gene of ``genes`` (default: a
        word-level tokenizer's), each once; ``seed`` seeds each batch (under torchrun ``processes``
        share them). Returns ``cell_name``, ``cell_sentence``, ``requested_cell_type`` (conditions:
        ``requested_<column>`` each); None off rank 0."""
        import math

        from utils.models.examples import decode_answer, encode_prompt

        def name(t: Any) -> str | tuple[tuple[str, str], ...] | None:
            if isinstance(t, Mapping | tuple):  # conditions on several columns
                return tuple((str(c), str(v)) for c, v in (t.items() if isinstance(t, Mapping) else t))
            return None if t is None else str(t)  # None: a cell of any type (unconditional)

        if isinstance(cell_types, str | None) or (isinstance(cell_types, Mapping) and cell_types
                                                  and all(isinstance(v, str) for v in cell_types.values())):
            cell_types = [cell_types]  # one type (or None: any, or one set of conditions: labels as values)
        # a list: each entry n_per_type times, in order (a type listed twice is asked twice)
        pairs = cell_types.items() if isinstance(cell_types, Mapping) else ((t, n_per_type) for t in cell_types)
        requested = [name(t) for t, n in pairs for _ in range(int(n))]
        if None in requested and not self.prompt_format.unconditional_templates:
            raise InputError(f"The {self.prompt_format.name} prompt format has no prompts for cells of any type; "
                             "name the cell types to generate.")
        self._check_requested(requested)
        conditioned = [t for t in requested if isinstance(t, tuple)]
        k = n_genes or self.top_k_genes
        fmt, tok = self.prompt_format, self.tokenizer
        prompts = [encode_prompt(tok, self._generation_prompt(t, k), fmt) for t in requested]
        names = list(genes) if genes is not None else self.known_genes()
        factory, kept = self.gene_constraint(names) if constrain_genes else (None, set())
        mine = processes.share(math.ceil(len(prompts) / batch_size)) if processes is not None else None
        answers = self.generate_ids(prompts, max_new_tokens or self.gene_budget(k, names), batch_size=batch_size,
                                    do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                    progress=progress, logits_processor_factory=factory, batch_seed=seed,
                                    batches=None if mine is None else set(mine.tolist()))
        if processes is not None:
            done = np.array([i for i, a in enumerate(answers) if a is not None], dtype=np.int64)
            answers = processes.gather(done, [answers[i] for i in done], len(prompts))
            if answers is None:
                return None
        sentences = [decode_answer(tok, a, fmt) for a in answers]
        if factory is not None:  # a sentence cut by the token budget may end inside a gene: drop that piece
            sentences = [" ".join(w[:-1] if w and w[-1] not in kept else w) for w in map(str.split, sentences)]
        cells = pd.DataFrame({"cell_name": [f"generated_{i:06d}" for i in range(len(requested))],
                              "cell_sentence": sentences})
        if not conditioned:
            cells["requested_cell_type"] = requested
        for column in dict.fromkeys(c for t in conditioned for c, _ in t):
            cells[f"requested_{column}"] = [dict(t).get(column) if isinstance(t, tuple) else None
                                            for t in requested]
        return cells

    def embed_cells(self, cells: Any, *, pooling: str = "mean", layer: int = -1, batch_size: int = 16,
                    n_genes: int | None = None, progress: Callable[[int], None] | None = None
                    ) -> np.ndarray:
        """Cell embeddings (cells x hidden, float32): ``layer``'s hidden states averaged over the
        sentence's tokens (``pooling="mean"``) or at the last token."""
        from utils.models.embedding import embed_batched

        genes = [s.split() for s in self.cell_sentences(cells, n_genes=n_genes)]
        n_layers = int(getattr(self.model.config, "num_hidden_layers", 0) or getattr(self.model.config, "n_layer", 0))
        if n_layers and not -(n_layers + 1) <= layer <= n_layers:
            raise InputError(f"layer {layer} is out of range: the model has {n_layers} layers "
                             f"(hidden states 0..{n_layers}, or -1 for the last).")
        return embed_batched(self.model, self.tokenizer, self.prompt_format, genes, pooling=pooling,
                             layer=layer, batch_size=batch_size, progress=progress)
