//! Placeholder until the preference readers land.

#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}
