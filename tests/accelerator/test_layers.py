"""The seam and the layers, checked on the source: no code outside hetmem/accelerator/ names
CUDA, and the layers below the public API import nothing from it."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# code directories (hetmem/ links chunk_manager/, tracer/, nvme/ and benchmarks/ into the namespace)
CODE_DIRS = ["hetmem", "chunk_manager", "tracer", "nvme", "benchmarks"]
SEAM = ROOT / "hetmem" / "accelerator"
# names that say "no CUDA" in a torch API
ALLOWED = {
    "hetmem/ops/builder.py": {"with_cuda"},   # CppExtension(with_cuda=False): a CPU-only op
}


def _python_files():
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_symlink() or SEAM in path.parents:
                continue
            yield path


def cuda_mentions(source: str) -> list[tuple[int, str]]:
    """(line, token) of code that names CUDA: identifiers containing it (``torch.cuda``,
    ``is_cuda``, ``CudaProbe``) and strings that are a CUDA device ("cuda", "cuda:1").
    Comments and prose in strings (help texts, docstrings) are not code."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and "cuda" in token.string.lower():
            found.append((token.start[0], token.string))
        elif token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str) and (value.lower() == "cuda" or value.lower().startswith("cuda:")):
                found.append((token.start[0], token.string))
    return found


def test_the_checker_finds_what_it_should():
    code = 'import torch\nif x.device.type == "cuda":\n    torch.cuda.synchronize()\n# cuda in a comment\nh = "cuda or cuda:N"\n'
    assert [line for line, _ in cuda_mentions(code)] == [2, 3]


def test_no_code_outside_the_seam_names_cuda():
    offenders = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED.get(rel, set())
        for line, token in cuda_mentions(path.read_text()):
            if token.strip("'\"") not in allowed and token not in allowed:
                offenders.append(f"{rel}:{line}: {token}")
    assert not offenders, "ask the accelerator seam (hetmem/accelerator/) instead:\n" + "\n".join(offenders)


# the layers below the public API, and what each may import from the hetmem namespace
LOWER = {
    "chunk_manager": {"chunk_manager", "nvme", "_core", "accelerator"},
    "nvme": {"nvme", "_core", "accelerator", "ops"},
    "tracer": {"tracer", "_core", "accelerator"},
    "hetmem/_core": {"_core"},
    "hetmem/accelerator": {"accelerator", "_core"},
    "hetmem/ops": {"ops", "_ops", "_core"},
}


def hetmem_imports(source: str) -> list[tuple[int, str]]:
    """(line, first name under hetmem) of every import of a hetmem module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "hetmem" else [f"hetmem.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "hetmem":
                found.append((node.lineno, parts[1] if len(parts) > 1 else ""))
    return found


def test_hetmem_imports_reads_every_form():
    code = "import hetmem.units\nfrom hetmem import engine\nfrom hetmem.nvme.aio import x\nfrom .x import y\n"
    assert hetmem_imports(code) == [(1, "units"), (2, "engine"), (3, "nvme")]


def test_lower_layers_import_nothing_from_the_public_api():
    offenders = []
    for folder, allowed in LOWER.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, name in hetmem_imports(path.read_text()):
                if name not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: hetmem.{name}")
    assert not offenders, "a lower layer imports from above it:\n" + "\n".join(offenders)
