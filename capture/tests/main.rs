//! Capture against a real throwaway PostgreSQL: one cluster per test binary, one fresh
//! database per test.

mod harness;
mod scenarios;
mod segments;
mod setup_errors;
