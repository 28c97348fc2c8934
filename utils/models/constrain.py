"""Constrained decoding: generated genes that are real, each once (prefix tries of the genes' token
ids, as first and as later word; the mask applies before sampling), and label scoring over a trie."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class GeneTrie:
    """Token-id sequences of genes in a prefix trie (node 0 is the root)."""

    def __init__(self) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.gene: list[int] = [-1]  # the gene ending at a node, -1 for none
        self.size: list[int] = [0]  # genes in the node's subtree
        self.paths: dict[int, list[int]] = {}  # gene -> its nodes, root excluded

    def add(self, ids: Sequence[int], gene: int) -> None:
        """Insert ``gene``'s ids (not empty, and no other gene's)."""
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
        self.gene[node] = gene
        for n in [0, *path]:
            self.size[n] += 1
        self.paths[gene] = path


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tail(tokenizer: Any, head: str, text: str) -> list[int]:
    """The ids ``text`` adds after ``head`` (its own ids when ``head``'s ids are no prefix)."""
    a, b = _ids(tokenizer, head), _ids(tokenizer, head + text)
    return b[len(a):] if b[: len(a)] == a else _ids(tokenizer, text)


def build_gene_tries(tokenizer: Any, genes: Iterable[str], *, answer_prefix: str = " ",
                     answer_suffix: str = "") -> tuple[GeneTrie, GeneTrie, list[int], list[str]]:
    """(first-word trie, later-word trie, closing ids: the answer suffix's then EOS, gene names) of
    ``genes``, those the tokenizer cannot spell, or spells like another gene, left out."""
    first, rest = GeneTrie(), GeneTrie()
    names: list[str] = []
    spelled: set[tuple[int, ...]] = set()  # (1, *first-word ids) and (2, *later-word ids) of the genes so far
    unk = tokenizer.unk_token_id
    anchor = answer_prefix + "A"
    for gene in dict.fromkeys(str(g) for g in genes):
        ids_first = _ids(tokenizer, answer_prefix + gene)
        ids_rest = _tail(tokenizer, anchor, " " + gene)
        if not ids_first or not ids_rest or (unk is not None and (unk in ids_first or unk in ids_rest)):
            continue
        keys = {(1, *ids_first), (2, *ids_rest)}
        if keys & spelled:
            continue  # spelled like an earlier gene: the tokens could not tell them apart
        spelled |= keys
        first.add(ids_first, len(names))
        rest.add(ids_rest, len(names))
        names.append(gene)
    closing = (_tail(tokenizer, anchor, answer_suffix) or _ids(tokenizer, answer_suffix)) if answer_suffix else []
    closing.append(int(tokenizer.eos_token_id))
    return first, rest, closing, names


class GeneConstraint:
    """A ``transformers`` logits processor: each row generates distinct genes of the tries
    (:func:`build_gene_tries`), then the closing ids. One per ``generate`` call (it keeps state)."""

    def __init__(self, first: GeneTrie, rest: GeneTrie, closing: Sequence[int], vocab_size: int) -> None:
        self.tries = (first, rest)
        self.closing = [int(t) for t in closing]
        self.vocab_size = int(vocab_size)
        self._sizes = tuple(np.asarray(t.size, dtype=np.int32) for t in self.tries)  # genes under each node
        roots = [t.children[0] for t in self.tries]
        self._root_tokens = tuple(np.array(list(r.keys()), dtype=np.int64) for r in roots)
        self._root_nodes = tuple(np.array(list(r.values()), dtype=np.int64) for r in roots)
        self._seen: int | None = None  # the tokens of each row read so far (None: no call yet)

    def _reset(self, batch: int, start: int) -> None:
        self._seen = start
        self._left = [tuple(s.copy() for s in self._sizes) for _ in range(batch)]  # of them, not yet named
        self._genes: list[set[int]] = [set() for _ in range(batch)]
        # Per row: (trie, node) while inside the genes, ("close", i) while closing, None when done.
        self._state: list[tuple[Any, int] | None] = [(0, 0)] * batch

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
        if gene >= 0 and gene not in self._genes[row]:  # it is named: one gene less under its nodes
            self._genes[row].add(gene)
            for named, left in zip(self.tries, self._left[row], strict=True):
                left[[0, *named.paths[gene]]] -= 1
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
        trie, left = self.tries[kind], self._left[row][kind]
        if node == 0:
            tokens = self._root_tokens[kind][left[self._root_nodes[kind]] > 0]
            if not len(tokens) and kind == 0:
                return np.array([self.closing[0]], dtype=np.int64)  # nothing to name
            return tokens
        parts = [np.array([t for t, c in trie.children[node].items() if left[c] > 0], dtype=np.int64)]
        gene = trie.gene[node]
        if gene >= 0 and gene not in self._genes[row]:
            roots = self._root_nodes[1]
            remaining = self._left[row][1][roots] - (roots == self.tries[1].paths[gene][0])  # this gene is taken now
            parts += [self._root_tokens[1][remaining > 0], np.array([self.closing[0]], dtype=np.int64)]
        return np.concatenate(parts)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        batch, length = input_ids.shape
        if self._seen is None or length < self._seen:
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


def label_sequences(tokenizer: Any, labels: Sequence[str], fmt: Any) -> list[list[int]]:
    """Token ids of each label's answer as it follows the prompt in training, EOS included (so
    that ``T`` and ``T cell`` are told apart)."""
    from utils.models.examples import encode_answer

    return [[*encode_answer(tokenizer, fmt.prediction_answer(x), fmt), int(tokenizer.eos_token_id)] for x in labels]


def _label_trie(sequences: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """The labels' token sequences as a prefix trie, each shared prefix once: per node its token,
    parent (-1: a child of the root, it follows the prompt) and depth; per label its nodes."""
    index: dict[tuple[int, ...], int] = {}
    token: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    paths: list[list[int]] = []
    for seq in sequences:
        path: list[int] = []
        for d in range(len(seq)):
            key = tuple(seq[: d + 1])
            if key not in index:
                index[key] = len(token)
                token.append(int(seq[d]))
                parent.append(path[-1] if path else -1)
                depth.append(d)
            path.append(index[key])
        paths.append(path)
    return token, parent, depth, paths


def score_labels(model: Any, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *,
                 pad_token_id: int, batch_size: int = 16, progress: Any = None) -> np.ndarray:
    """Log-probability of every label's token sequence after every prompt (cells x labels): per
    batch, the prompts (their cache kept), then the inner nodes of the labels' trie (``_label_trie``)
    over that cache, each node seeing its prompt and its own ancestors only (a 4-d mask)."""
    import torch

    from utils.models.generation import left_pad

    token, parent_of, depth, paths = _label_trie(labels)
    sees_all = np.zeros((len(token), len(token)), dtype=bool)  # node i may see node j: j is i or an ancestor
    for path in paths:
        for d, node in enumerate(path):
            sees_all[node, path[: d + 1]] = True
    # Only nodes with children are fed: a leaf (each label's EOS) is read at its parent.
    fed = np.array(sorted(set(parent_of) - {-1}), dtype=np.int64)
    slot = np.full(len(token), -1, dtype=np.int64)
    slot[fed] = np.arange(len(fed))
    n_nodes = len(fed)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    node_tokens = torch.as_tensor(np.asarray(token)[fed], dtype=torch.long, device=device)
    node_depth = torch.as_tensor(np.asarray(depth)[fed], dtype=torch.long, device=device)
    sees = torch.as_tensor(sees_all[np.ix_(fed, fed)], device=device)
    every_token = torch.as_tensor(token, device=device)
    parents = np.asarray(parent_of)
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
                        use_cache=True, **({"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}))
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            allowed = torch.cat([prompt_mask[:, None, :].expand(-1, n_nodes, -1), sees[None].expand(n, -1, -1)], dim=2)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, lowest)
            nodes = model(input_ids=node_tokens.expand(n, -1), attention_mask=additive[:, None],
                          position_ids=mask_t.sum(-1, keepdim=True) + node_depth[None, :], use_cache=True,
                          **{"cache" if _takes(model, "cache") else "past_key_values": cache})
            # Position 0 is after the prompt, i + 1 after fed node i; only (cells x nodes) values kept.
            logits = torch.cat([out.logits[:, -1:], nodes.logits], dim=1).float()
            at = parent + 1
            rows = torch.arange(n, device=device)[:, None]
            node_logp = logits[rows, at[None, :], every_token[None, :]] - logits.logsumexp(-1)[:, at]
        per_node = node_logp.double().cpu().numpy()
        scores[batch] = np.stack([per_node[:, path].sum(1) for path in paths], axis=1)
        if progress is not None:
            progress(len(batch))
    return scores


def _takes(model: Any, name: str) -> bool:
    """Whether the model's forward takes ``name`` (``cache``: transformers 5's ``past_key_values``)."""
    import inspect

    return name in inspect.signature(model.forward).parameters
