"""The wiring: topics, state and stores around the processors, one subpackage per concern
(ingest, sleep, kafka, elastic, embedded, models, observe, erasure). Import the subpackages;
nothing is re-exported here (most need the ``stream`` extra).
"""

__all__: list[str] = []
