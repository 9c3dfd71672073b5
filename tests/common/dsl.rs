//! Request builders and assertions shared by the behaviour tests.

#![allow(dead_code)]
