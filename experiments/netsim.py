"""Simulates DeepSeek's multi-plane network (ISCA'25 "Insights into DeepSeek-V3" §5) at flow level:
all-to-all on MPFT vs MRFT, DeepEP dispatch / combine, AllGather / ReduceScatter by routing,
isolation between two jobs, link and switch failures, latency; tables, then one JSON line, and a PNG.

  python -m experiments.netsim [--format=markdown|json] [--png=netsim.png] [--seed=0]

About a minute on two CPU cores.
"""

from absl import app, flags

from deepseek_jax.analysis.netsim import report

_FORMAT = flags.DEFINE_enum('format', 'markdown', ['markdown', 'json'], 'Output format.')
_PNG = flags.DEFINE_string('png', 'netsim.png', 'Where to write the figure ("" for none).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of job placement, routing draws and ECMP hashes.')


def main(argv):
  del argv
  tables = report.build(_SEED.value)
  if _FORMAT.value == 'markdown':
    print(report.to_markdown(tables))
  if _PNG.value:
    report.plot(tables, _PNG.value)
  print(report.to_json(tables))


if __name__ == '__main__':
  app.run(main)
