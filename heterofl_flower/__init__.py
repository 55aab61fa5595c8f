"""HeteroFL on Flower (the ``flower`` extra): the library's experiments in Flower's simulation
on Ray and on real devices (SuperLink and SuperNodes). Importing this package imports no Flower;
its modules do."""
