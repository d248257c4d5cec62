"""An operation's cost, checked before it runs: each field counts once for every
item of the lists around it, so a page of orders each naming its customer's orders
(a read per item) costs what answering it would.

A field taking ``page_size`` or ``limit`` yields up to that many items (the
argument's default when it is left out, its largest value when it is a variable):
the list inside what it returns (a page's ``items``) counts that many times, the
page's own fields (``total_count``) once.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLList,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    get_named_type,
    get_nullable_type,
)
from strawberry.extensions import AddValidationRules

from app import params as checked
from app.query import MAX_LIMIT

# Items a list argument yields: (when left out, at most), as the views take them.
LIST_ARGUMENTS = {
    "page_size": (20, checked.MAX_PAGE_SIZE),
    "limit": (100, MAX_LIMIT),
}
Fragments = Mapping[str, FragmentDefinitionNode]


class MaxCostLimiter(AddValidationRules):
    """Refuse an operation that costs more than ``max_cost`` (see the module)."""

    def __init__(self, max_cost: int) -> None:
        super().__init__([_rule(max_cost)])


def _rule(max_cost: int) -> type[ValidationRule]:
    class MaxCost(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            fragments = {
                d.name.value: d
                for d in context.document.definitions
                if isinstance(d, FragmentDefinitionNode)
            }
            for operation in context.document.definitions:
                if not isinstance(operation, OperationDefinitionNode):
                    continue
                found = operation_cost(context.schema, operation, fragments)
                if found > max_cost:
                    name = operation.name.value if operation.name else "the operation"
                    context.report_error(
                        GraphQLError(
                            f"{name} costs {found}, over the limit of {max_cost}: "
                            "each field counts once per item of the lists around "
                            "it; ask for smaller pages or fewer nested lists",
                            operation,
                        )
                    )

    return MaxCost


def operation_cost(
    schema: GraphQLSchema, operation: OperationDefinitionNode, fragments: Fragments
) -> int:
    root = schema.get_root_type(OperationType(operation.operation))
    return 0 if root is None else _cost(operation.selection_set, root, fragments, set())


def _cost(
    selections: SelectionSetNode,
    parent: GraphQLObjectType,
    fragments: Fragments,
    entered: set[str],
    pending: int = 1,
) -> int:
    """What ``selections`` cost; ``pending``: the items a page above asked for,
    which the next list down has."""
    total = 0
    for node in selections.selections:
        if isinstance(node, FieldNode):
            field = parent.fields.get(node.name.value)
            total += 1
            if field is None or node.selection_set is None:
                continue  # __typename, or a field the schema's own rules refuse
            inner = get_named_type(field.type)
            if not isinstance(inner, GraphQLObjectType):
                continue
            asked = pending * items(node, field)
            listed = isinstance(get_nullable_type(field.type), GraphQLList)
            times, below = (asked, 1) if listed else (1, asked)
            total += times * _cost(node.selection_set, inner, fragments, entered, below)
        else:
            found = _fragment(node, parent, fragments, entered)
            if found is not None:
                selection, condition, name = found
                total += _cost(selection, condition, fragments, entered | name, pending)
    return total


def _fragment(
    node: object, parent: GraphQLObjectType, fragments: Fragments, entered: set[str]
) -> tuple[SelectionSetNode, GraphQLObjectType, set[str]] | None:
    """An inline fragment's or a spread's selections and type; None for a spread
    of an unknown fragment or of one inside itself (the standard rules refuse
    those documents)."""
    if isinstance(node, InlineFragmentNode):
        return node.selection_set, parent, set()
    if not isinstance(node, FragmentSpreadNode):
        return None
    name = node.name.value
    fragment = fragments.get(name)
    if fragment is None or name in entered:
        return None
    return fragment.selection_set, parent, {name}


def items(node: FieldNode, field: GraphQLField) -> int:
    """How many items ``field`` yields at most (1 for a field that is no list)."""
    given = {a.name.value: a.value for a in node.arguments or ()}
    for name, (default, most) in LIST_ARGUMENTS.items():
        if name not in field.args:
            continue
        value = given.get(name)
        if value is None:
            return default
        if isinstance(value, IntValueNode):
            return max(1, min(int(value.value), most))
        return most  # a variable: whatever it may be
    return 1
