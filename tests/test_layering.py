"""Dependencies point one way: the layer picture of deepseek_jax/DESIGN.md, "Layers", checked on
every import (module- and function-level) of deepseek_jax/ and kernels/; and the README's
"What is here" table against the tree. Pure `ast` and file reads, no JAX import."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent

# deepseek_jax/DESIGN.md, "Layers": a module may import only from its own layer or lower ones.
# Longest prefix wins; `deepseek_jax` itself (its __init__ only re-exports config) is layer 0.
LAYERS = {
    'deepseek_jax': 0,
    'deepseek_jax.config': 0,
    'deepseek_jax.hostmem': 0,
    'kernels': 0,
    'deepseek_jax.fp8': 1,
    'deepseek_jax.sharding': 2,
    'deepseek_jax.layers': 3,
    'deepseek_jax.model': 4,
    'deepseek_jax.checkpoint': 5,
    'deepseek_jax.data': 5,
    'deepseek_jax.convert': 6,
    'deepseek_jax.train': 7,
    'deepseek_jax.inference': 7,
    'deepseek_jax.analysis': 8,
}
# Same layer, still forbidden: training and inference never import each other.
SIBLINGS_APART = ('deepseek_jax.train', 'deepseek_jax.inference')


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _source_files():
  return sorted([*ROOT.glob('deepseek_jax/**/*.py'), *ROOT.glob('kernels/**/*.py')])


def _resolve(name):
  """`from deepseek_jax import model` names the submodule when one exists, else the package."""
  path = ROOT.joinpath(*name.split('.'))
  return name if path.with_suffix('.py').exists() or path.is_dir() else name.rsplit('.', 1)[0]


def _imports(path, source=None):
  """(line, text, imported module) for every import of our own packages in the file."""
  module = _module_name(path)
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  out = []
  for node in ast.walk(ast.parse(source or path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        out.append((node.lineno, f'import {alias.name}', alias.name))
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split('.')[:len(package.split('.')) - (node.level - 1)]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      text = f'from {"." * node.level}{node.module or ""} import ' + ', '.join(a.name for a in node.names)
      for alias in node.names:
        out.append((node.lineno, text, _resolve(f'{source}.{alias.name}')))
  return [(line, text, name) for line, text, name in out
          if name.split('.')[0] in ('deepseek_jax', 'kernels')]


def _layer_of(name):
  prefixes = [p for p in LAYERS if name == p or name.startswith(p + '.')]
  assert prefixes, f'{name} is in no layer of deepseek_jax/DESIGN.md, "Layers": add it there and here'
  top = max(prefixes, key=len)
  return top, LAYERS[top]


def test_every_module_has_a_layer():
  files = _source_files()
  assert len(files) > 40, files
  for path in files:
    _layer_of(_module_name(path))


def test_imports_point_down():
  violations = []
  for path in _source_files():
    importer = _module_name(path)
    group, layer = _layer_of(importer)
    for line, text, name in _imports(path):
      target, target_layer = _layer_of(name)
      where = f'{path.relative_to(ROOT)}:{line}: `{text}`'
      if group == 'kernels' and not name.startswith('kernels'):
        violations.append(f'{where}: kernels/ (layer 0) imports deepseek_jax ({target}); '
                          'kernels import only jax')
      elif target_layer > layer:
        violations.append(f'{where}: {group} (layer {layer}) imports {target} (layer {target_layer})')
      elif group in SIBLINGS_APART and target in SIBLINGS_APART and target != group:
        violations.append(f'{where}: {group} and {target} (both layer 7) must not import each other')
  assert not violations, 'imports against deepseek_jax/DESIGN.md, "Layers":\n' + '\n'.join(violations)


def test_checker_sees_an_upward_import():
  # The checker itself: function-level and relative upward imports are found and resolved.
  path = ROOT / 'deepseek_jax' / 'layers' / 'norm.py'
  code = 'def f():\n  from deepseek_jax.train import loop\n  from ..model import DeepSeekV3\n'
  found = [(line, name) for line, _, name in _imports(path, code)]
  assert found == [(2, 'deepseek_jax.train.loop'), (3, 'deepseek_jax.model')]
  assert _layer_of('deepseek_jax.train.loop') == ('deepseek_jax.train', 7)
  assert _layer_of('deepseek_jax.model') == ('deepseek_jax.model', 4)
  assert _layer_of(_module_name(path)) == ('deepseek_jax.layers', 3)


# --- README "What is here" ---------------------------------------------------------------

def _what_is_here_rows():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('## What is here', 1)[1].split('\n## ', 1)[0]
  rows = [line for line in section.splitlines() if line.startswith('| `')]
  assert rows, 'no table rows under "## What is here"'
  return rows


def _row_paths(row):
  """The first cell's paths (`a` · `b`, relative to the first one's folder when bare), and the
  second cell's backticked file names when the first cell is a folder."""
  first, rest = row.split('|')[1], '|'.join(row.split('|')[2:])
  heads = re.findall(r'`([^`]+)`', first)
  base = pathlib.PurePosixPath(heads[0]).parent
  paths = [h if '/' in h else str(base / h) for h in heads]
  if heads[0].endswith('/'):
    paths += [heads[0] + name for name in re.findall(r'`([\w./]+\.(?:py|ipynb|md))`', rest)]
  return paths


def test_readme_table_names_existing_paths():
  missing = [(path, row[:60]) for row in _what_is_here_rows() for path in _row_paths(row)
             if not (ROOT / path).exists()]
  assert not missing, f'README "What is here" names paths that do not exist: {missing}'


def test_readme_table_covers_the_package():
  # A package counts as named when the table names it or a file inside it.
  named = {p.rstrip('/') for row in _what_is_here_rows() for p in _row_paths(row)}
  top = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / 'deepseek_jax').iterdir()
               if p.name not in ('__init__.py', '__pycache__') and not p.name.startswith('.'))
  absent = [p for p in top if not any(n == p or n.startswith(p + '/') for n in named)]
  assert not absent, f'deepseek_jax/ entries missing from README "What is here": {absent}'
