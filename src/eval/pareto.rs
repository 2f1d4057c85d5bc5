//! Two-objective trade-offs: the Pareto front of (score₁, score₂) points, both maximised,
//! and its exact 2-D hypervolume with respect to a reference point.

/// The non-dominated points, sorted by the first objective ascending (so the second
/// descends). A point is dominated when another is ≥ in both objectives and > in one;
/// duplicates keep one copy. Non-finite points are ignored.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    // Highest x first (ties: highest y first); sweep keeping points that raise the best y.
    pts.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in pts {
        if front.last().is_none_or(|last| p.1 > last.1) {
            front.push(p);
        }
    }
    front.reverse();
    front
}

/// The area dominated by the front and bounded below by `reference` (a point worse than
/// every point of interest in both objectives): the union of the rectangles
/// `[ref.0, x] × [ref.1, y]`. Points not better than the reference in both objectives
/// contribute nothing.
pub fn hypervolume(points: &[(f64, f64)], reference: (f64, f64)) -> f64 {
    let front: Vec<(f64, f64)> = pareto_front(points)
        .into_iter()
        .filter(|&(x, y)| x > reference.0 && y > reference.1)
        .collect();
    // Front sorted by x ascending, y descending: each point adds the slab between the
    // previous point's x and its own, at its own height.
    let mut area = 0.0;
    let mut prev_x = reference.0;
    for (x, y) in front {
        area += (x - prev_x) * (y - reference.1);
        prev_x = x;
    }
    area
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_drops_dominated_points() {
        let pts = [
            (1.0, 5.0),
            (2.0, 4.0),
            (1.5, 3.0),
            (3.0, 1.0),
            (2.0, 4.0),
            (0.5, 0.5),
        ];
        assert_eq!(pareto_front(&pts), vec![(1.0, 5.0), (2.0, 4.0), (3.0, 1.0)]);
    }

    #[test]
    fn hypervolume_of_hand_computed_cases() {
        // One point: a rectangle 2 × 3.
        assert_eq!(hypervolume(&[(2.0, 3.0)], (0.0, 0.0)), 6.0);
        // Staircase (1,3), (2,2), (3,1) over (0,0): 1·3 + 1·2 + 1·1 = 6.
        assert_eq!(
            hypervolume(&[(3.0, 1.0), (1.0, 3.0), (2.0, 2.0)], (0.0, 0.0)),
            6.0
        );
        // A dominated point adds nothing; a point below the reference is ignored.
        assert_eq!(
            hypervolume(
                &[(1.0, 3.0), (2.0, 2.0), (3.0, 1.0), (1.0, 1.0), (-1.0, 9.0)],
                (0.0, 0.0)
            ),
            6.0
        );
        // Negative scores with a matching reference point.
        assert!((hypervolume(&[(-1.0, -2.0), (-2.0, -1.0)], (-3.0, -3.0)) - 3.0).abs() < 1e-12);
    }
}
