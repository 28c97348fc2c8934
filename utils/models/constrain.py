"""Decoding that names only real genes, each once: a logits processor over a prefix trie.

Every gene is encoded the way it appears in an answer: as the first word (after the prompt, with
the format's answer prefix) and as a later word (after a space). With a word-level tokenizer
each is one token; with a byte-pair tokenizer a few. Two prefix tries over these token
sequences say, at every step and for every row of a batch, which tokens may follow: the
children of the current node that still lead to an unused gene, and, once a gene is complete,
the start of another unused gene or the end of the answer (the format's closing text, then
EOS). The mask is applied before temperature, top-k and top-p, so sampling happens among
valid continuations only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["GeneTrie", "GeneConstraint", "build_gene_tries"]


class GeneTrie:
    """Token-id sequences of genes in a prefix trie (node 0 is the root)."""

    def __init__(self) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.gene: list[int] = [-1]  # the gene ending at a node, -1 for none
        self.size: list[int] = [0]  # genes in the node's subtree
        self.paths: dict[int, list[int]] = {}  # gene -> its nodes, root excluded

    def spells(self, ids: Sequence[int]) -> bool:
        """Whether a gene ends after exactly ``ids``."""
        node = 0
        for token in ids:
            node = self.children[node].get(int(token), -1)
            if node < 0:
                return False
        return self.gene[node] >= 0

    def add(self, ids: Sequence[int], gene: int) -> bool:
        """Insert ``gene``'s ids; False (nothing added) when another gene has the same ids."""
        node, path = 0, []
        for token in ids:
            nxt = self.children[node].get(int(token))
            if nxt is None:
                nxt = len(self.children)
                self.children[node][int(token)] = nxt
                self.children.append({})
                self.gene.append(-1)
                self.size.append(0)
            node = nxt
            path.append(node)
        if not path or self.gene[node] != -1:
            return False
        self.gene[node] = gene
        for n in [0, *path]:
            self.size[n] += 1
        self.paths[gene] = path
        return True

    @property
    def n_nodes(self) -> int:
        return len(self.children)


def _tail(tokenizer: Any, head: str, text: str) -> list[int] | None:
    """The ids ``text`` adds after ``head`` (None when ``head``'s ids are no prefix)."""
    a = tokenizer(head, add_special_tokens=False)["input_ids"]
    b = tokenizer(head + text, add_special_tokens=False)["input_ids"]
    return list(b[len(a):]) if list(b[: len(a)]) == list(a) else None


def build_gene_tries(tokenizer: Any, genes: Iterable[str], *, answer_prefix: str = " ",
                     answer_suffix: str = "") -> tuple[GeneTrie, GeneTrie, list[int], list[str]]:
    """(first-word trie, later-word trie, closing ids, gene names) for ``genes``.

    Genes the tokenizer cannot spell (an unknown token) or that it spells like another gene are
    left out. The closing ids are the answer suffix's ids after a gene, then EOS.
    """
    first, rest = GeneTrie(), GeneTrie()
    names: list[str] = []
    unk = tokenizer.unk_token_id
    anchor = answer_prefix + "A"
    for gene in dict.fromkeys(str(g) for g in genes):
        ids_first = list(tokenizer(answer_prefix + gene, add_special_tokens=False)["input_ids"])
        ids_rest = _tail(tokenizer, anchor, " " + gene)
        if ids_rest is None:
            ids_rest = list(tokenizer(" " + gene, add_special_tokens=False)["input_ids"])
        if not ids_first or not ids_rest or (unk is not None and (unk in ids_first or unk in ids_rest)):
            continue
        if first.spells(ids_first) or rest.spells(ids_rest):
            continue  # spelled like an earlier gene: the tokens could not tell them apart
        first.add(ids_first, len(names))
        rest.add(ids_rest, len(names))
        names.append(gene)
    closing: list[int] = []
    if answer_suffix:
        closing = _tail(tokenizer, anchor, answer_suffix) or list(
            tokenizer(answer_suffix, add_special_tokens=False)["input_ids"])
    closing.append(int(tokenizer.eos_token_id))
    return first, rest, closing, names


class GeneConstraint:
    """A ``transformers`` logits processor: each row generates distinct genes of the tries,
    then the closing ids. Make one per ``generate`` call (it keeps the rows' state).

    Parameters
    ----------
    first, rest, closing
        From :func:`build_gene_tries`.
    vocab_size
        Width of the logits.
    """

    def __init__(self, first: GeneTrie, rest: GeneTrie, closing: Sequence[int], vocab_size: int) -> None:
        self.tries = (first, rest)
        self.closing = [int(t) for t in closing]
        self.vocab_size = int(vocab_size)
        self._sizes = tuple(np.asarray(t.size, dtype=np.int32) for t in self.tries)
        self._root_tokens = tuple(np.fromiter(t.children[0].keys(), dtype=np.int64, count=len(t.children[0]))
                                  for t in self.tries)
        self._root_nodes = tuple(np.fromiter(t.children[0].values(), dtype=np.int64, count=len(t.children[0]))
                                 for t in self.tries)
        self._start: int | None = None
        self._seen = 0

    def _reset(self, batch: int, start: int) -> None:
        self._start, self._seen = start, start
        self._used = [tuple(np.zeros(t.n_nodes, dtype=np.int32) for t in self.tries) for _ in range(batch)]
        self._genes: list[set[int]] = [set() for _ in range(batch)]
        # Per row: (trie, node) while inside the genes, ("close", i) while closing, None when done.
        self._state: list[tuple[Any, int] | None] = [(0, 0)] * batch

    def _use(self, row: int, gene: int) -> None:
        self._genes[row].add(gene)
        for k, trie in enumerate(self.tries):
            used = self._used[row][k]
            used[0] += 1
            used[trie.paths[gene]] += 1

    def _step(self, row: int, token: int) -> None:
        state = self._state[row]
        if state is None:
            return
        kind, node = state
        if kind == "close":
            self._state[row] = ("close", node + 1) if node + 1 < len(self.closing) and token == self.closing[node] else None
            return
        trie = self.tries[kind]
        child = trie.children[node].get(token)
        if child is not None:
            self._state[row] = (kind, child)
            return
        gene = trie.gene[node]
        if gene >= 0 and gene not in self._genes[row]:
            self._use(row, gene)
            nxt = self.tries[1].children[0].get(token)
            if nxt is not None:
                self._state[row] = (1, nxt)
                return
            if token == self.closing[0]:
                self._state[row] = ("close", 1) if len(self.closing) > 1 else None
                return
        self._state[row] = None  # a token the mask did not allow (e.g. forced): stop constraining

    def _allowed(self, row: int) -> np.ndarray | None:
        state = self._state[row]
        if state is None:
            return None
        kind, node = state
        if kind == "close":
            return np.array([self.closing[node]], dtype=np.int64)
        trie, used = self.tries[kind], self._used[row][kind]
        sizes = self._sizes[kind]
        if node == 0:
            tokens, nodes = self._root_tokens[kind], self._root_nodes[kind]
            parts = [tokens[sizes[nodes] - used[nodes] > 0]]
            if not len(parts[0]) and kind == 0:
                parts.append(np.array([self.closing[0]], dtype=np.int64))  # nothing to name
            return np.concatenate(parts)
        items = list(trie.children[node].items())
        parts = [np.array([t for t, c in items if sizes[c] - used[c] > 0], dtype=np.int64)]
        gene = trie.gene[node]
        if gene >= 0 and gene not in self._genes[row]:
            rest_used = self._used[row][1]
            rest_sizes = self._sizes[1]
            remaining = rest_sizes[self._root_nodes[1]] - rest_used[self._root_nodes[1]]
            own = self.tries[1].paths[gene][0]
            remaining = remaining - (self._root_nodes[1] == own)  # this gene is taken now
            parts.append(self._root_tokens[1][remaining > 0])
            parts.append(np.array([self.closing[0]], dtype=np.int64))
        return np.concatenate(parts)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        batch, length = input_ids.shape
        if self._start is None or length < self._seen:
            self._reset(batch, length)
        if length > self._seen:
            new = input_ids[:, self._seen:length].cpu().numpy()
            for row in range(batch):
                for token in new[row]:
                    self._step(row, int(token))
            self._seen = length
        mask = np.zeros(scores.shape, dtype=bool)
        for row in range(batch):
            allowed = self._allowed(row)
            if allowed is None:
                mask[row] = True
            else:
                mask[row, allowed[allowed < scores.shape[1]]] = True
        keep = torch.from_numpy(mask).to(scores.device)
        return scores.masked_fill(~keep, float("-inf"))


# --------------------------------------------------------------------------- labels


def label_sequences(tokenizer: Any, labels: Sequence[str], fmt: Any) -> list[list[int]]:
    """Token ids of each label's answer as it follows the prompt in training, EOS included
    (``utils.models.examples.join_example``), so that a label that is a prefix of another (``T`` and
    ``T cell``) is still told apart."""
    from utils.models.examples import encode_answer

    return [[*encode_answer(tokenizer, fmt.prediction_answer(x), fmt), int(tokenizer.eos_token_id)] for x in labels]


class LabelTrie:
    """The labels' token sequences as a prefix trie, its nodes in breadth-first order: the
    tokens every label needs, each shared prefix once."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        index: dict[tuple[int, ...], int] = {}
        self.token: list[int] = []
        self.parent: list[int] = []  # -1: a child of the root (follows the prompt)
        self.depth: list[int] = []
        self.paths: list[list[int]] = []
        for seq in sequences:
            path = []
            for d in range(len(seq)):
                key = tuple(seq[: d + 1])
                if key not in index:
                    index[key] = len(self.token)
                    self.token.append(int(seq[d]))
                    self.parent.append(path[-1] if path else -1)
                    self.depth.append(d)
                path.append(index[key])
            self.paths.append(path)

    def __len__(self) -> int:
        return len(self.token)

    def ancestry(self) -> np.ndarray:
        """(nodes x nodes) bool: node i may see node j (j is i or one of its ancestors)."""
        n = len(self)
        sees = np.eye(n, dtype=bool)
        for i in range(n):
            j = self.parent[i]
            while j >= 0:
                sees[i, j] = True
                j = self.parent[j]
        return sees


def score_labels(model: Any, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *,
                 pad_token_id: int, batch_size: int = 16, progress: Any = None) -> np.ndarray:
    """Log-probability of every label's token sequence after every prompt (cells x labels).

    The answer is constrained to the label set by scoring every label whole, in two forward
    passes per batch: the left-padded prompts (their cache kept, as generation starts), then
    the inner nodes of the labels' prefix trie (:class:`LabelTrie`) over that cache, with a
    4-d attention mask that lets every node see its prompt and its own ancestors only, at the
    positions it would have after the prompt. So a shared prefix is computed once and nothing is
    repeated per label; a node's token probability is read at its parent's position (the
    prompt's last for a label's first token). On the example model this costs what greedy
    free-text decoding of the same cells costs (``bench/predict_bench.py``).
    """
    import torch

    from utils.models.generation import left_pad

    trie = LabelTrie(labels)
    # Only nodes with children are fed: a leaf (each label's EOS) is read at its parent, so its
    # own state is never needed.
    fed = np.array(sorted(set(trie.parent) - {-1}), dtype=np.int64)
    slot = np.full(len(trie), -1, dtype=np.int64)
    slot[fed] = np.arange(len(fed))
    n_nodes = len(fed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    node_tokens = torch.as_tensor(np.asarray(trie.token)[fed], dtype=torch.long, device=device)
    node_depth = torch.as_tensor(np.asarray(trie.depth)[fed], dtype=torch.long, device=device)
    sees = torch.as_tensor(trie.ancestry()[np.ix_(fed, fed)], device=device)
    every_token = torch.as_tensor(trie.token, device=device)
    parents = np.asarray(trie.parent)
    parent = torch.as_tensor(np.where(parents >= 0, slot[np.maximum(parents, 0)], -1),
                             device=device)  # per node, its parent's fed slot (-1: the root)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    scores = np.zeros((len(prompts), len(labels)), dtype=np.float64)
    lowest = torch.finfo(dtype).min
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in batch], pad_token_id)
        n = len(batch)
        ids_t, mask_t = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)
        prompt_mask = mask_t.bool()
        with torch.inference_mode():
            out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, **_last_logits(model, 1))
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            allowed = torch.cat([prompt_mask[:, None, :].expand(-1, n_nodes, -1), sees[None].expand(n, -1, -1)], dim=2)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, lowest)
            nodes = model(input_ids=node_tokens.expand(n, -1), attention_mask=additive[:, None],
                          position_ids=mask_t.sum(-1, keepdim=True) + node_depth[None, :], use_cache=True,
                          **{_cache_argument(model): cache})
            # Position 0 is after the prompt, i + 1 after fed node i: a node's probability is read
            # at its parent's position, only (cells x nodes) values kept (the vocabulary may be large).
            logits = torch.cat([out.logits[:, -1:], nodes.logits], dim=1).float()
            at = parent + 1
            rows = torch.arange(n, device=device)[:, None]
            node_logp = logits[rows, at[None, :], every_token[None, :]] - logits.logsumexp(-1)[:, at]
        per_node = node_logp.double().cpu().numpy()
        scores[batch] = np.stack([per_node[:, path].sum(1) for path in trie.paths], axis=1)
        if progress is not None:
            progress(len(batch))
    return scores


def _last_logits(model: Any, n: int) -> dict[str, int]:
    """Ask for the logits of the last ``n`` positions only, where the model supports it."""
    import inspect

    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its cache by: ``cache`` (transformers 5), formerly
    ``past_key_values`` (a deprecated alias there)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
