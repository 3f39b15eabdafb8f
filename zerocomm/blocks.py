"""Block discovery: a model (or its pipeline chunks) as blocks in forward
order, each with its parameters, and the one naming rule for parameters of
multi-chunk models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from torch import nn

Chunks = Union[nn.Module, Sequence[nn.Module]]
BlocksArg = Union[None, Sequence[nn.Module], Callable[[nn.Module], Iterable[nn.Module]]]


@dataclass
class RawBlock:
    name: str
    module: nn.Module
    params: list[nn.Parameter]  # every param (frozen included), module.parameters() order


def as_chunks(chunks: Chunks) -> list[nn.Module]:
    if isinstance(chunks, nn.Module):
        return [chunks]
    if isinstance(chunks, (list, tuple)):
        if not chunks:
            raise ValueError("no model chunks given: pass a module or a non-empty list of modules")
        for c, m in enumerate(chunks):
            if not isinstance(m, nn.Module):
                raise TypeError(f"chunks[{c}] is a {type(m).__name__}, expected torch.nn.Module")
        return list(chunks)
    raise TypeError(f"model must be a torch.nn.Module or a list of them, got {type(chunks).__name__}")


def _contains_module_list(m: nn.Module) -> bool:
    return any(isinstance(s, nn.ModuleList) for s in m.modules())


def _auto_blocks(chunk: nn.Module, prefix: str, out: list[RawBlock], seen: set[int]) -> None:
    def add(module: nn.Module, name: str, params: list[nn.Parameter]) -> None:
        if params:
            out.append(RawBlock(prefix + name, module, params))

    def leaf(module: nn.Module, name: str) -> None:
        if id(module) in seen:  # the same module reached twice is one block
            return
        seen.add(id(module))
        add(module, name, list(module.parameters()))

    def walk(module: nn.Module, qual: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        # the module's own pre-hook fires before any child's, so its direct params go first
        add(module, qual or "<root>", list(module.parameters(recurse=False)))
        for name, child in module.named_children():
            cq = f"{qual}.{name}" if qual else name
            if isinstance(child, nn.ModuleList):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                add(child, cq, list(child.parameters(recurse=False)))
                for i, el in child.named_children():
                    leaf(el, f"{cq}.{i}")
            elif _contains_module_list(child):
                walk(child, cq)
            else:
                leaf(child, cq)

    walk(chunk, "")


def _user_blocks(chunks: list[nn.Module], prefixes: list[str], blocks: BlocksArg) -> list[RawBlock]:
    qualnames = [{id(m): q for q, m in ch.named_modules()} for ch in chunks]
    per_chunk: list[list[nn.Module]] = [[] for _ in chunks]
    if callable(blocks) and not isinstance(blocks, nn.Module):
        for c, ch in enumerate(chunks):
            got = blocks(ch)
            for m in _block_list(got, f"blocks(chunk {c})"):
                if id(m) not in qualnames[c]:
                    raise ValueError(
                        f"blocks(chunk {c}) returned a {type(m).__name__} that is not inside that model chunk"
                    )
                per_chunk[c].append(m)
    else:
        for k, m in enumerate(_block_list(blocks, "blocks")):
            found = next((c for c in range(len(chunks)) if id(m) in qualnames[c]), None)
            if found is None:
                raise ValueError(f"blocks[{k}] (a {type(m).__name__}) is not inside the model")
            per_chunk[found].append(m)

    out: list[RawBlock] = []
    seen: set[int] = set()
    for c, ch in enumerate(chunks):
        covered: set[int] = set()
        for m in per_chunk[c]:
            if id(m) in seen:
                continue
            seen.add(id(m))
            params = list(m.parameters())
            covered.update(id(p) for p in params)
            if params:
                out.append(RawBlock(prefixes[c] + (qualnames[c][id(m)] or "<root>"), m, params))
        # whatever the user's blocks miss still has to be synced before the chunk runs
        rest = [p for p in ch.parameters() if id(p) not in covered]
        if rest:
            out.append(RawBlock(prefixes[c] + "<rest>", ch, rest))
    return out


def _block_list(blocks, what: str) -> list[nn.Module]:
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    if isinstance(blocks, nn.Module):
        return [blocks]
    if not isinstance(blocks, (list, tuple)):
        try:
            blocks = list(blocks)
        except TypeError:
            raise TypeError(
                f"{what} must be a list of modules or a callable (chunk) -> list of modules, "
                f"got {type(blocks).__name__}"
            ) from None
    for k, m in enumerate(blocks):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}[{k}] is a {type(m).__name__}, expected torch.nn.Module")
    return list(blocks)


def chunk_prefix(c: int, n_chunks: int) -> str:
    """The one naming rule for models given as several chunks (pipeline
    stages): names inside chunk c are prefixed "chunk{c}."."""
    return f"chunk{c}." if n_chunks > 1 else ""


def discover(chunks: list[nn.Module], blocks: BlocksArg) -> list[RawBlock]:
    prefixes = [chunk_prefix(c, len(chunks)) for c in range(len(chunks))]
    if blocks is not None:
        return _user_blocks(chunks, prefixes, blocks)
    out: list[RawBlock] = []
    seen: set[int] = set()
    for ch, prefix in zip(chunks, prefixes):
        _auto_blocks(ch, prefix, out, seen)
    return out


def discover_blocks(chunks: Chunks, blocks: BlocksArg = None) -> list[tuple[str, nn.Module]]:
    """Blocks of the model in forward order, as (name, module).

    A ModuleList child gives one block per element; a child containing a ModuleList
    deeper down is descended into with the same rules; any other child is one block.
    Direct parameters of a module we descended into form a block named after it
    ("<root>" for the chunk). `blocks=` (a list of modules or a callable
    chunk -> modules) overrides this; parameters it misses go to "<rest>".
    """
    return [(b.name, b.module) for b in discover(as_chunks(chunks), blocks)]
