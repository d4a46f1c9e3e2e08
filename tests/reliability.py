"""The promises hfbench makes to a cluster user, and the tests that try to break each one.

`make test` sums the outcome of every test per promise and writes docs/reliability.md (the
table and its counts); tests/test_docs.py checks that every test named here exists, so the
table cannot point at a test that is gone. A test may serve several promises."""

from __future__ import annotations

# (promise, where it is made, node-id prefixes of the tests that try to break it)
PROMISES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "A preempted or timed-out run resumes bit for bit where the uninterrupted run ends (every method; "
        "one rank and two), in one MLflow run",
        "docs/cluster.md",
        (
            "tests/test_resume.py::",
            "tests/test_e2e.py::test_slurm_preemption",
            "tests/test_cluster.py::test_time_limit",
            "tests/test_cluster.py::test_two_node",
            "tests/test_faults.py::test_a_rank_told_of_the_stop",
            "tests/test_faults.py::test_usr2_after",
        ),
    ),
    (
        "A run across two SLURM nodes trains, checkpoints, requeues, resumes and ends as on one node",
        "docs/cluster.md",
        ("tests/test_cluster.py::test_two_node",),
    ),
    (
        "Several ranks end with identical weights; ZeRO stages train the same model",
        "docs/cluster.md",
        ("tests/test_distributed.py::", "tests/test_cluster.py::test_two_rank"),
    ),
    (
        "A node failure, a controller outage or scancel ends in a resumed or clearly ended run, never a lost one",
        "docs/cluster.md",
        (
            "tests/test_cluster.py::test_node_failure",
            "tests/test_cluster.py::test_a_controller_outage",
            "tests/test_cluster.py::test_scancel",
            "tests/test_cluster.py::test_a_deleted_submitit",
            "tests/test_faults.py::test_a_poll_that_lands_on_node_fail",
        ),
    ),
    (
        "Nothing is lost on a crash: checkpoints survive kills mid-write and corruption; final metrics are logged once",
        "docs/cluster.md",
        (
            "tests/test_faults.py::test_kill_",
            "tests/test_faults.py::test_corrupt_checkpoint",
            "tests/test_faults.py::test_weights_cut_short",
            "tests/test_faults.py::test_a_snap_in_the_last_epoch",
            "tests/test_faults.py::test_disk_full",
        ),
    ),
    (
        "An MLflow outage loses no metric: calls are spooled, delivered to the run that made them, and a "
        "silent server is named within a bounded time",
        "docs/cluster.md",
        (
            "tests/test_faults.py::test_mlflow_down",
            "tests/test_faults.py::test_a_spool",
            "tests/test_faults.py::test_a_line_cut_short",
            "tests/test_faults.py::test_a_store_that_does_not_know",
            "tests/test_faults.py::test_a_tracking_server_that_never_answers",
            "tests/test_faults.py::test_status_and_report_name_a_silent_server",
            "tests/test_faults.py::test_sync_",
        ),
    ),
    (
        "One config trains once per experiment, whatever the sweeps, folders or reruns that ask for it",
        "docs/cluster.md",
        (
            "tests/test_faults.py::test_two_sweeps",
            "tests/test_faults.py::test_a_run_folder_of_another",
            "tests/test_faults.py::test_a_claim_whose",
            "tests/test_e2e.py::test_sweep_through_slurm",
            "tests/test_e2e.py::test_failing_task",
        ),
    ),
    (
        "A run's identity (its hash) does not change unless what it trains changes",
        "docs/protocol.md",
        (
            "tests/test_config.py::test_golden_run_hashes",
            "tests/test_config.py::test_run_hash_is_stable",
            "tests/test_config.py::test_inputs_of_other_pressure",
        ),
    ),
    (
        "Bad input is refused before anything is submitted, in one line naming the field, exit code 2",
        "README.md",
        (
            "tests/test_bad_input.py::",
            "tests/test_config.py::test_bad_",
            "tests/test_config.py::test_an_alias",
            "tests/test_config.py::test_missing_and_malformed",
            "tests/test_cli.py::test_config_errors",
            "tests/test_cli.py::test_read_only_commands",
            "tests/test_cli.py::test_train_on_a_sweep_config",
            "tests/test_cli.py::test_an_epochs_override",
            "tests/test_cluster.py::test_requests_the_cluster_cannot_satisfy",
            "tests/test_faults.py::test_corrupt_beton",
            "tests/test_faults.py::test_data_file_of_the_wrong",
            "tests/test_faults.py::test_a_batch_larger",
        ),
    ),
    (
        "Hostile values, paths and files are refused or inert; the services listen on loopback",
        "docs/testing.md",
        ("tests/test_security.py::",),
    ),
    (
        "SIGTERM or Ctrl-C to a sweep says what it cancels and leaves nothing running",
        "docs/cluster.md",
        ("tests/test_faults.py::test_sigterm",),
    ),
    (
        "The report is built from the runs the engine trained, every number as the run logged it",
        "docs/protocol.md",
        (
            "tests/test_e2e.py::test_sweep_through_local_executor",
            "tests/test_report.py::",
            "tests/test_report_browser.py::",
        ),
    ),
]
