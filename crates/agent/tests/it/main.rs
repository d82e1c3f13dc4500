//! Integration tests of the agent SDK against a scripted fake gateway.

mod binary;
mod fake_gateway;
mod frames;
mod sdk;
mod shared_state;
