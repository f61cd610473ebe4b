//! Cursor pagination shared by the list endpoints: `limit` (bounded) and
//! an opaque `cursor` that the previous page's `next_cursor` gave.

use crate::error::{ApiError, FieldProblem};

/// The page size asked for, within `1..=max` (default `default`).
pub fn limit(asked: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    let limit = asked.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(
            "invalid query parameters",
            vec![FieldProblem::field(
                "limit",
                format!("must be within 1..={max}"),
            )],
        ));
    }
    Ok(limit)
}

pub fn bad_cursor() -> ApiError {
    ApiError::bad_request(
        "invalid query parameters",
        vec![FieldProblem::field(
            "cursor",
            "is not a cursor this endpoint returned (use `next_cursor` as given)",
        )],
    )
}
