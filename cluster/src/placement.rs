//! Where a new volume's copies go, without any IO: on distinct live nodes with room for it,
//! the emptiest first. What cannot be placed is refused with the reason and what would be
//! needed.

use std::fmt::Write as _;

use crate::schema::{check_name, MAX_REPLICAS};

/// A live node that could hold a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    /// Bytes it can still give to volumes.
    pub free_bytes: u64,
    /// Copies it holds already.
    pub copies: usize,
}

/// A volume to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub replicas: usize,
}

/// Why a volume cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{0}")]
    Name(String),
    #[error(
        "--replicas {0}: a volume has 1 to {MAX_REPLICAS} copies (3 survives any one node's loss)"
    )]
    Replicas(usize),
    #[error("--size {size}: not a positive multiple of the block size {block_size}")]
    Size { size: u64, block_size: u32 },
    #[error("{replicas} copies need {replicas} distinct live nodes; {live} registered{names}: start more nodes, or ask for fewer copies")]
    TooFewNodes {
        replicas: usize,
        live: usize,
        names: String,
    },
    #[error(
        "{replicas} copies of {size} bytes need {replicas} nodes with that much free; {detail}"
    )]
    NoRoom {
        replicas: usize,
        size: u64,
        detail: String,
    },
}

/// The nodes for `request`'s copies, in order (the first is the first primary).
pub fn place(request: &Request, candidates: &[Candidate]) -> Result<Vec<String>, PlacementError> {
    check_name("volume name", &request.name)
        .map_err(|error| PlacementError::Name(error.to_string()))?;
    if request.replicas == 0 || request.replicas > MAX_REPLICAS {
        return Err(PlacementError::Replicas(request.replicas));
    }
    let block = request.block_size as u64;
    if request.size == 0 || block == 0 || !request.size.is_multiple_of(block) {
        return Err(PlacementError::Size {
            size: request.size,
            block_size: request.block_size,
        });
    }
    if candidates.len() < request.replicas {
        let mut names = String::new();
        if !candidates.is_empty() {
            let listed: Vec<&str> = candidates.iter().map(|c| c.node.as_str()).collect();
            let _ = write!(names, ": {}", listed.join(", "));
        }
        return Err(PlacementError::TooFewNodes {
            replicas: request.replicas,
            live: candidates.len(),
            names,
        });
    }
    let mut roomy: Vec<&Candidate> = candidates
        .iter()
        .filter(|candidate| candidate.free_bytes >= request.size)
        .collect();
    if roomy.len() < request.replicas {
        let detail = candidates
            .iter()
            .map(|c| format!("{} has {} free", c.node, c.free_bytes))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(PlacementError::NoRoom {
            replicas: request.replicas,
            size: request.size,
            detail,
        });
    }
    // The emptiest first, then the fewest copies; by name for the same answer every time.
    roomy.sort_by(|a, b| {
        b.free_bytes
            .cmp(&a.free_bytes)
            .then(a.copies.cmp(&b.copies))
            .then(a.node.cmp(&b.node))
    });
    Ok(roomy
        .into_iter()
        .take(request.replicas)
        .map(|candidate| candidate.node.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, free: u64, copies: usize) -> Candidate {
        Candidate {
            node: name.into(),
            free_bytes: free,
            copies,
        }
    }

    fn request(replicas: usize, size: u64) -> Request {
        Request {
            name: "vol1".into(),
            size,
            block_size: 4096,
            replicas,
        }
    }

    #[test]
    fn copies_go_to_the_emptiest_distinct_nodes() {
        let nodes = [
            node("a", 10 << 30, 2),
            node("b", 50 << 30, 0),
            node("c", 20 << 30, 1),
            node("d", 20 << 30, 0),
        ];
        assert_eq!(
            place(&request(3, 1 << 30), &nodes).unwrap(),
            ["b", "d", "c"]
        );
        assert_eq!(place(&request(1, 1 << 30), &nodes).unwrap(), ["b"]);
    }

    #[test]
    fn what_cannot_be_placed_is_refused_with_the_reason() {
        let nodes = [node("a", 8 << 30, 0), node("b", 2 << 30, 0)];
        let error = place(&request(3, 1 << 30), &nodes).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("3 distinct live nodes; 2 registered: a, b"),
            "{error}"
        );
        let error = place(&request(2, 4 << 30), &nodes).unwrap_err();
        assert!(
            error.to_string().contains("b has 2147483648 free"),
            "{error}"
        );
        let error = place(&request(2, 4097), &nodes).unwrap_err();
        assert!(matches!(error, PlacementError::Size { .. }), "{error}");
        assert!(matches!(
            place(&request(0, 4096), &nodes),
            Err(PlacementError::Replicas(0))
        ));
        let mut bad = request(1, 4096);
        bad.name = "a/b".into();
        assert!(matches!(place(&bad, &nodes), Err(PlacementError::Name(_))));
    }

    proptest! {
        #[test]
        fn a_placement_is_distinct_roomy_and_as_many_as_asked(
            free in proptest::collection::vec(0u64..100, 0..9),
            replicas in 0usize..9,
            size in 1u64..100,
        ) {
            let nodes: Vec<Candidate> = free
                .iter()
                .enumerate()
                .map(|(i, &free)| node(&format!("n{i}"), free * 4096, i % 3))
                .collect();
            let asked = request(replicas, size * 4096);
            match place(&asked, &nodes) {
                Ok(chosen) => {
                    prop_assert_eq!(chosen.len(), replicas);
                    let mut distinct = chosen.clone();
                    distinct.sort();
                    distinct.dedup();
                    prop_assert_eq!(distinct.len(), replicas);
                    for name in &chosen {
                        let candidate = nodes.iter().find(|c| &c.node == name).unwrap();
                        prop_assert!(candidate.free_bytes >= asked.size);
                    }
                }
                Err(_) => {
                    let roomy = nodes.iter().filter(|c| c.free_bytes >= asked.size).count();
                    prop_assert!(replicas == 0 || replicas > MAX_REPLICAS || roomy < replicas);
                }
            }
        }
    }
}
