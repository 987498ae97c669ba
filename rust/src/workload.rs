//! Workload vCPUs (filled in by the workload work).
