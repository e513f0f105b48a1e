"""Layering: no import cycle among the project's modules, counting imports inside functions too."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('qwenvl_jax', 'convert', 'train', 'qwenvl_eval', 'serve')


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for file in (ROOT / package).rglob('*.py'):
      parts = file.relative_to(ROOT).with_suffix('').parts
      out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = file
  return out


def import_graph() -> dict[str, set[str]]:
  """Module -> the project modules it imports (at module level or in any function)."""
  modules = _modules()
  graph = {}
  for name, file in modules.items():
    package = name if file.name == '__init__.py' else name.rpartition('.')[0]
    edges = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        # `from pkg import sub` imports the submodule; `from mod import name` the module itself
        subs = [f'{base}.{alias.name}' for alias in node.names if f'{base}.{alias.name}' in modules]
        targets = subs if len(subs) == len(node.names) else subs + [base]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph = import_graph()
  assert 'qwenvl_jax.model' in graph and 'convert.core' in graph
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_finder_sees_function_level_imports(tmp_path):
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None
  graph = import_graph()
  assert 'qwenvl_jax.checkpoint' in graph['qwenvl_jax.quant']  # imported inside `quant.load`


def test_modules_are_not_shadowed_by_the_exported_functions():
  import importlib
  import types
  import qwenvl_jax
  for name in ('generate', 'chat', 'chat_stream', 'generate_stream'):
    assert not isinstance(getattr(qwenvl_jax, name), types.ModuleType)
  for name in _modules():
    if name.startswith('qwenvl_jax.'):
      attr = getattr(qwenvl_jax, name.split('.')[1], None)
      assert attr is None or isinstance(attr, types.ModuleType), f'qwenvl_jax.{name} is shadowed by {attr}'
      assert isinstance(importlib.import_module(name), types.ModuleType)
