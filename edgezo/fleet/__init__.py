"""A fleet of devices learning together: federated ZO rounds on Flower, exchanging seed-log records.

Each round every device trains K steps from the same weights as an ordinary job on its own edgezo
daemon, and sends back the job's step records (seeds and a few scalars), never weights. The server
checks them (`records`), merges them in a fixed order into the federation's log (`fedlog`), and
sends the merged records to every device, which rebuilds the weights by replay (`replay`). The
federation's log is a seed-log: `edgezo replay` rebuilds the federated model anywhere.

Modules: records (the wire format and its checks), fedlog (the merged log), replay (start a job
from a log), device (the device side of a round), server_app / client_app (the Flower app),
launch (a SuperLink and N SuperNodes with their daemons on one machine). docs/fleet.md has more.

Importing this package does not import torch or flwr.
"""

FLEET_METHODS = ("mezo", "fzoo", "kerzoo")  # methods whose step records redo their update alone
