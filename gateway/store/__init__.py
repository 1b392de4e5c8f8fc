"""The store: instance files on disk and their SQLite index, the single source of truth.

What lives here, and why some of it is not only "files and the index":

- `files`, `instance`, `index`, `store`, `schema`, `migrations`, `names`: the files, the
  checks a received file passes, the index's tables and its one writer thread, how an index of
  an earlier release is brought up to date.
- `jobs` (dispatch jobs and the delivery ledger), `completions` (the rules' waits) and `query`
  (C-FIND matching as SQL): these are the index's tables and the SQL over them. They stay next
  to the writer because the promise that nothing which matters lives only in memory rests on
  transactions that span them: a completed wait and its jobs are one transaction
  (`CompletionStore.close` queues through `jobs.enqueue_job`), as are a retrieval's forward step
  and its jobs, an acknowledgement and the lease it renews, a deleted study and its ledger
  rows. Their state machines are described where they are used: the completion engine in
  `gateway.rules.runtime`, the dispatcher in `gateway.scu.dispatch`, the query services in
  `gateway.scp.handlers`; the tables and their transitions are here.
- `retention` and `backup`: the store's own upkeep.
"""
