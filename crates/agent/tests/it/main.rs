//! Integration tests of the agent SDK against a scripted fake gateway.

mod binary;
mod fake_gateway;
mod sdk;
