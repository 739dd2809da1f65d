"""What every route needs: the project, the authenticated user and their role, and names checked against the
project (a case id, method or run that the project does not have is a 404, so no URL can name a path)."""
from __future__ import annotations

from typing import Callable

from fastapi import Depends, HTTPException, Request

from backend.project import Project
from backend.server.auth import User


def get_project(request: Request) -> Project:
    """The project, dataset.json read afresh (another process, the CLI, may have changed it)."""
    return Project(request.app.state.project_root)


def current_user(request: Request) -> User:
    """The user of the request's ``Authorization: Bearer <token>``; 401 without one or with a wrong one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    user = request.app.state.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise HTTPException(401, "missing or wrong token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})
    return user


def require(action: str) -> Callable[..., User]:
    """A dependency: the current user, 403 unless their role allows ``action`` (read, annotate, train)."""
    def dependency(user: User = Depends(current_user)) -> User:
        if not user.may(action):
            raise HTTPException(403, f"user '{user.name}' ({user.role}) may not {action}")
        return user
    return dependency


def known_case(case: str, project: Project = Depends(get_project)) -> str:
    """``case`` when the project has it (404 otherwise, whatever the string holds)."""
    if case not in project.case_ids():
        raise HTTPException(404, f"no case '{case}' in this project")
    return case
