"""The edgezo daemon: a torch-free asyncio service that schedules fine-tuning workers.

Modules: `core` (the scheduling loop and worker supervision), `api` + `http` (the Unix-socket
HTTP/1.1 JSON API), `store` (SQLite WAL), `monitor` (device memory), `leases` (the lease broker),
`windows` (cron windows via APScheduler), `sdnotify` (systemd notify + socket activation),
`main` (start-up). Never import torch anywhere under this package.
"""
