#!/usr/bin/env bash
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_benchmark.sh" slake "$@"  # see run_benchmark.sh for the settings
